//! The iSCSI target dataplane.
//!
//! Layers, top to bottom on a write (see README, Architecture):
//! - [`net`]: transports (kernel TCP today), bytes in and out per connection;
//! - [`iscsi`]: the sans-IO protocol core (PDU codec, login, negotiation, sessions, sequencing);
//! - [`scsi`]: SPC-4/SBC-3 command emulation per LUN;
//! - [`bdev`]: block devices with asynchronous submit/poll completion;
//! - [`mem`]: I/O buffers shared by the layers above;
//! - [`tgt`]: the object model and its configuration;
//! - [`reactor`]: the thread that drives all of the above for the connections it owns.

pub mod bdev;
pub mod iscsi;
pub mod logger;
pub mod mem;
pub mod net;
pub mod reactor;
pub mod scsi;
pub mod tgt;
