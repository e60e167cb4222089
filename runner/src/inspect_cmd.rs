//! `fer inspect` (what a checkpoint or weights file holds) and `fer parity` (the PyTorch
//! fixtures on a device).

pub fn parity(dir: &std::path::Path, device: &str) -> anyhow::Result<()> {
    let dev = fer_model::device::select(device)?;
    let cases = fer_model::parity::cases_in(dir)?;
    anyhow::ensure!(
        !cases.is_empty(),
        "{}: no parity case folders",
        dir.display()
    );
    let mut failed = 0;
    for case in &cases {
        let (total, fails) = fer_model::parity::check_case(case, &dev)?;
        println!(
            "{} on {device}: {}/{total} tensors within tolerance",
            case.display(),
            total - fails.len()
        );
        for (k, m) in &fails {
            println!("  FAIL {k}: {m}");
        }
        failed += fails.len();
    }
    anyhow::ensure!(failed == 0, "{failed} tensor(s) out of tolerance");
    Ok(())
}

pub fn inspect(path: &std::path::Path) -> anyhow::Result<()> {
    use fer_model::checkpoint;
    // Our checkpoint carries its metadata; anything else is a weights file of some format.
    let ours = match path.extension().is_some_and(|e| e == "safetensors") {
        true => checkpoint::read_meta(path).ok(),
        false => None,
    };
    let tensors = if let Some(meta) = ours {
        println!("{}", serde_json::to_string_pretty(&meta)?);
        checkpoint::read_safetensors(path)?
    } else {
        let file = fer_model::weights::read_state_dict(path)?;
        println!("{}: {}", path.display(), file.origin());
        file.tensors
    };
    let mut names: Vec<_> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype()))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let params: usize = tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("optim."))
        .map(|(_, t)| t.elem_count())
        .sum();
    for (k, dims, dtype) in &names {
        println!("{k}\t{dims:?}\t{dtype:?}");
    }
    println!(
        "{} tensors, {params} values (optimizer state excluded)",
        names.len()
    );
    Ok(())
}
