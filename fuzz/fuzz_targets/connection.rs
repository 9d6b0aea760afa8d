//! Whole byte streams into a connection: the PDU decoder, the login state machine (with
//! CHAP), text negotiation, and full feature phase with a real SCSI device behind it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iscsi_tgt_fuzz::run_connection(data);
});
