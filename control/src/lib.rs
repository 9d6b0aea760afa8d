//! The control plane's shared-memory ABI, used by both the dataplane and `iscsictl`.
//!
//! The dataplane creates one segment per instance (`/dev/shm/iscsi-tgt.<instance>`): a
//! [`Header`] (magic, ABI version, sizes, dataplane pid, start time, heartbeat) followed by
//! one statistics block per reactor, then per-object blocks (each reactor's LUNs and
//! connections, [`ObjectStats`]). Each block is a seqlock: the reactor that owns it bumps
//! the sequence to odd, stores its counters and bumps it to even; a reader retries until it
//! sees the same even sequence before and after its loads, so it never reads a torn block and
//! never makes the dataplane wait. Everything a reader maps is validated before use: a
//! foreign, truncated, stale or half-written segment is an error, never a crash.
//!
//! Commands travel through a command ring and answers through a response ring (fixed slots,
//! a generation per slot): `iscsictl` writes a record (JSON) and then its generation, and
//! advances the head; the dataplane takes records in order between reactor iterations,
//! validates each, and writes the answer in the response slot of the same number. Several
//! `iscsictl` are serialised by an exclusive lock on the segment file.

pub mod segment;

pub use segment::{
    segment_path, AbiError, Header, Incoming, ObjectKind, ObjectStats, ObjectWriter, ReactorStats,
    Segment, StatsWriter, LATENCY_BUCKETS, MAX_RECORD, OBJECTS_PER_REACTOR, OBJECT_NAME_BYTES,
    RING_SLOTS,
};

/// Magic at the start of the control segment ("ISCSICTL" little-endian).
pub const ABI_MAGIC: u64 = u64::from_le_bytes(*b"ISCSICTL");
/// Bumped on every incompatible change of the segment layout.
pub const ABI_VERSION: u32 = 4;

#[cfg(test)]
mod tests {
    #[test]
    fn magic_spells_its_name() {
        assert_eq!(&super::ABI_MAGIC.to_le_bytes(), b"ISCSICTL");
    }
}
