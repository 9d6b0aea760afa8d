//! The sans-IO iSCSI protocol core.
