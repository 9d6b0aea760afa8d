//! Configuration files through the loader, and what loads back through the writer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = dataplane::tgt::config::parse(text, "fuzz.toml") {
        let saved = dataplane::tgt::save::to_toml(&c);
        let back = dataplane::tgt::config::parse(&saved, "saved.toml")
            .unwrap_or_else(|e| panic!("saved configuration does not load: {e}\n{saved}"));
        assert_eq!(back, c, "round trip");
    }
});
