//! The one place a compute device is chosen.

use candle_core::Device;

/// `"cpu"`, `"cuda"` or `"cuda:N"`. CUDA needs the `cuda` cargo feature; asking for it without
/// the feature is an error, never a silent fall-back to the CPU.
pub fn select(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = match cuda.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("device {name:?}: expected cuda:<index>"))?,
                None => 0,
            };
            cuda_device(ordinal)
        }
        other => anyhow::bail!("unknown device {other:?}: expected cpu, cuda or cuda:<index>"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> anyhow::Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> anyhow::Result<Device> {
    anyhow::bail!(
        "this build has no CUDA support: rebuild with `--features cuda` (see README, GPU)"
    )
}
