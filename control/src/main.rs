//! `iscsictl`: the control-plane process. Its commands arrive with the control-plane issue.

fn main() {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") | Some("version") => {
            println!(
                "iscsictl {} (control ABI v{})",
                env!("CARGO_PKG_VERSION"),
                control::ABI_VERSION
            );
        }
        _ => {
            eprintln!("iscsictl: the control plane is not implemented yet (see README: Roadmap)");
            std::process::exit(2);
        }
    }
}
