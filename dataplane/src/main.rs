fn main() {
    eprintln!("iscsi-tgt: not yet");
}
