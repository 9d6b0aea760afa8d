//! Text key=value data through the parser and the negotiator (normal and discovery).
#![no_main]
use dataplane::iscsi::params::{Negotiator, SessionType};
use dataplane::iscsi::text;
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = text::parse(data) {
        let g = dataplane::tgt::Global::default();
        for st in [SessionType::Normal, SessionType::Discovery] {
            let mut n = Negotiator::new(&g, st);
            for (k, v) in &pairs {
                let _ = n.offer(k, v);
            }
            let _ = n.finish();
        }
    }
});
