//! A minimal stderr logger for the `log` facade: level from the command line or config,
//! one line per record with a monotonic timestamp.

use log::{LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::time::Instant;

struct StderrLogger {
    start: Instant,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "[{:>5}.{:06} {:<5} {}] {}",
            t.as_secs(),
            t.subsec_micros(),
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Parses a level name (error, warn, info, debug, trace, off).
pub fn parse_level(name: &str) -> Option<LevelFilter> {
    name.parse().ok()
}

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    static LOGGER: std::sync::OnceLock<StderrLogger> = std::sync::OnceLock::new();
    let logger = LOGGER.get_or_init(|| StderrLogger {
        start: Instant::now(),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    #[test]
    fn level_names() {
        assert_eq!(super::parse_level("debug"), Some(log::LevelFilter::Debug));
        assert_eq!(super::parse_level("nonsense"), None);
    }
}
