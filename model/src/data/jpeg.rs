//! JPEG decoding with libjpeg (the libjpeg-turbo decoder, as built by the `mozjpeg` crate): the
//! decoder behind PIL's `Image.open(...).convert('RGB')` in DAN's pipeline and OpenCV's `imread`
//! in EAC's, so the pixels a model sees equal PyTorch's bit for bit (accurate integer IDCT, fancy
//! chroma upsampling: libjpeg's defaults, PIL's too).
//!
//! Why not the `image` crate's decoder: on the 512 px test photo 0.94 % of its values differ from
//! PIL's by up to 3/255 (`bench/official_pipeline.py`), which moved the probabilities of
//! DAN-format networks by up to 0.27 against the official pipeline; and it decodes a truncated
//! file without a word. Like PIL, a file that ends early is an error here; libjpeg's other
//! warnings (e.g. extraneous bytes between markers) are ignored, as PIL ignores them.

use std::ffi::{c_int, CStr};

use anyhow::bail;
use mozjpeg_sys as ffi;

/// Decoded 8-bit RGB: (width, height, interleaved pixels). `None` for JPEGs libjpeg cannot turn
/// into RGB (CMYK / YCCK), which the caller decodes another way.
pub fn decode_rgb(bytes: &[u8]) -> anyhow::Result<Option<(usize, usize, Vec<u8>)>> {
    let result = std::panic::catch_unwind(|| -> std::io::Result<_> {
        let d = mozjpeg::decompress::DecompressBuilder::new()
            .with_err(error_manager())
            .from_mem(bytes)?;
        if matches!(
            d.color_space(),
            ffi::J_COLOR_SPACE::JCS_CMYK | ffi::J_COLOR_SPACE::JCS_YCCK
        ) {
            return Ok(None);
        }
        let mut d = d.rgb()?;
        let (w, h) = (d.width(), d.height());
        let pixels: Vec<u8> = d.read_scanlines()?;
        d.finish()?;
        Ok(Some((w, h, pixels)))
    });
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => bail!("libjpeg: {e}"),
        Err(payload) => match payload.downcast::<String>() {
            Ok(msg) => bail!("libjpeg: {msg}"),
            Err(_) => bail!("libjpeg failed"),
        },
    }
}

/// libjpeg's standard error manager with our two hooks: a fatal error, and a warning that the
/// data ended early, unwind (as the `mozjpeg` crate's own manager does) with libjpeg's message.
fn error_manager() -> ffi::jpeg_error_mgr {
    // SAFETY: `jpeg_error_mgr` is plain C data (integers, pointers, nullable function pointers),
    // for which all-zero is valid, and `jpeg_std_error` then sets every field.
    let mut err: ffi::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: `err` is a valid, exclusively borrowed manager for the call's duration.
    unsafe { ffi::jpeg_std_error(&mut err) };
    err.error_exit = Some(fatal);
    err.emit_message = Some(message_hook);
    err
}

extern "C-unwind" fn fatal(cinfo: &mut ffi::jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(message(cinfo)));
}

extern "C-unwind" fn message_hook(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    // Level -1 is a warning (levels >= 0 are trace messages). PIL fails on a truncated file
    // ("image file is truncated") and decodes through the others.
    if level < 0 {
        let text = message(cinfo);
        if text.contains("remature end") {
            std::panic::resume_unwind(Box::new(format!(
                "{text} (the file is truncated or corrupt)"
            )));
        }
    }
}

/// libjpeg's message template for the current code (without its parameters filled in).
fn message(cinfo: &ffi::jpeg_common_struct) -> String {
    // SAFETY: libjpeg calls the hooks with `cinfo.err` pointing at the manager `error_manager`
    // made (owned by the decompressor for its lifetime); `jpeg_std_error` set its table to
    // libjpeg's static array of NUL-terminated strings indexed 0..=last_jpeg_message.
    unsafe {
        let err = &*cinfo.err;
        let code = err.msg_code;
        if code > 0 && code <= err.last_jpeg_message && !err.jpeg_message_table.is_null() {
            let s = *err.jpeg_message_table.add(code as usize);
            if !s.is_null() {
                return CStr::from_ptr(s).to_string_lossy().into_owned();
            }
        }
        format!("message {code}")
    }
}
