//! Start and stop a private local fleet.
