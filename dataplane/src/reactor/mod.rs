//! Reactors.
