fn main() { eprintln!("iova bench: not written yet"); std::process::exit(1); }
