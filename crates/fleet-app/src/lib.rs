//! A pgfleet node.
