//! The `.pth` reader on opcodes the small fixture checkpoint does not use: a full-size DAN
//! release stores every numel >= 65536 with BININT (4-byte int), which this test writes by hand,
//! inside the release layout {'iter', 'model_state_dict', 'optimizer_state_dict'}.

use std::io::Write;

use fer_model::checkpoint::read_pth_state_dict;

/// Minimal pickle-protocol-2 writer for the handful of opcodes torch.save uses.
struct Pickle(Vec<u8>);

impl Pickle {
    fn unicode(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }
    fn binint(&mut self, v: i32) {
        self.0.push(b'J');
        self.0.extend(v.to_le_bytes());
    }
    fn binint1(&mut self, v: u8) {
        self.0.extend([b'K', v]);
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend(b")R"); // EMPTY_TUPLE, REDUCE
    }
    /// torch._utils._rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', numel), 0, shape, stride, False, OrderedDict())
    fn tensor(&mut self, key: &str, shape: &[i32]) {
        let numel: i32 = shape.iter().product();
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.0.push(b'('); // MARK (args)
        self.0.push(b'('); // MARK (persistent id)
        self.unicode("storage");
        self.global("torch", "FloatStorage");
        self.unicode(key);
        self.unicode("cpu");
        self.binint(numel);
        self.0.push(b't'); // TUPLE
        self.0.push(b'Q'); // BINPERSID
        self.binint1(0);
        self.0.push(b'(');
        for &d in shape {
            self.binint(d);
        }
        self.0.push(b't');
        self.0.push(b'(');
        let mut stride = 1;
        let mut strides = vec![0; shape.len()];
        for i in (0..shape.len()).rev() {
            strides[i] = stride;
            stride *= shape[i];
        }
        for s in strides {
            self.binint(s);
        }
        self.0.push(b't');
        self.0.push(0x89); // NEWFALSE
        self.ordered_dict();
        self.0.push(b't'); // TUPLE (args)
        self.0.push(b'R'); // REDUCE
    }
}

#[test]
fn reads_binint_sizes_and_ignores_the_optimizer_state() {
    let shape = [300i32, 256]; // 76,800 elements: numel and sizes are BININT
    let numel = (shape[0] * shape[1]) as usize;
    let mut p = Pickle(vec![0x80, 2, b'}']); // PROTO 2, EMPTY_DICT
    p.0.push(b'(');
    p.unicode("iter");
    p.binint(123_456);
    p.unicode("model_state_dict");
    p.ordered_dict();
    p.unicode("fc.weight");
    p.tensor("0", &shape);
    p.0.push(b's'); // SETITEM into the state dict
    p.unicode("optimizer_state_dict");
    p.0.push(b'}');
    p.unicode("state");
    p.0.push(b'}');
    p.0.push(b's');
    p.0.push(b'u'); // SETITEMS into the top dict
    p.0.push(b'.');

    let path = crate::common::scratch("binint").join("binint.pth");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("release/data.pkl", opts).unwrap();
    zip.write_all(&p.0).unwrap();
    zip.start_file("release/data/0", opts).unwrap();
    let values: Vec<f32> = (0..numel).map(|i| i as f32 * 0.5).collect();
    for v in &values {
        zip.write_all(&v.to_le_bytes()).unwrap();
    }
    zip.start_file("release/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();

    let state = read_pth_state_dict(&path).unwrap();
    assert_eq!(
        state.len(),
        1,
        "only the model_state_dict tensors: {:?}",
        state.keys().collect::<Vec<_>>()
    );
    let t = &state["fc.weight"];
    assert_eq!(t.dims(), &[300, 256]);
    let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got[0], 0.0);
    assert_eq!(got[numel - 1], (numel - 1) as f32 * 0.5);
    assert_eq!(got[257], 128.5);
    std::fs::remove_file(&path).unwrap();
}
