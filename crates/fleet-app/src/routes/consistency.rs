//! Read-your-writes, by consistency token: a write answers with its `X-Fleet-Lsn`, and a read that sends
//! it back as `X-Fleet-Min-Lsn` is served only by a server that has replayed it (see `db::read`).

use actix_web::http::header::HeaderValue;

use super::header::Header;
use crate::db::{parse_token, Token};
use crate::errors::ApiError;

/// On a successful write: `<timeline>/<LSN>`, a position at or after its commit (see `db::token`).
pub const LSN: &str = "X-Fleet-Lsn";
/// On a read: serve it only from a server on that timeline that has replayed that LSN.
pub const MIN_LSN: &str = "X-Fleet-Min-Lsn";

/// A read's `X-Fleet-Min-Lsn`.
#[derive(Debug)]
pub struct MinLsn;

impl Header for MinLsn {
    const NAME: &'static str = MIN_LSN;
    type Value = Token;

    fn parse(value: &HeaderValue) -> Result<Token, ApiError> {
        value.to_str().ok().and_then(parse_token).ok_or_else(|| {
            ApiError::InvalidToken(format!(
                "{MIN_LSN} must be a token as {LSN} gives it: <timeline>/<LSN>, e.g. 2/0/16B3740"
            ))
        })
    }
}
