//! One node (or a few) on a private PostgreSQL each: the API's contract, its limits and its failures.
//! One test binary, so its tests share the test threads and the suite links one executable, not fourteen.

mod abandoned;
mod api;
mod bulk;
mod contract;
mod fuzz;
mod hostile;
mod idempotency;
mod input;
mod isolation;
mod lifecycle;
mod limits;
mod openapi;
mod stall;
mod tls;
