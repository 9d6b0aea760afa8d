//! A block device backed by a regular file or a block device (in progress).
