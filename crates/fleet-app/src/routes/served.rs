//! Who served a response, and read-your-writes: `X-Fleet-Served-By`, `X-Fleet-Lsn` on writes and
//! `X-Fleet-Min-Lsn` on reads (see `db::read`).

use std::future::{ready, Ready};

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, HttpResponseBuilder};

use crate::db::{parse_token, ServedBy, Token};
use crate::errors::ApiError;

/// `primary` or `replica:<member>`, on every response that read or wrote data.
pub const SERVED_BY: &str = "X-Fleet-Served-By";
/// On a successful write: `<timeline>/<LSN>`, a position at or after its commit (see `db::token`).
pub const LSN: &str = "X-Fleet-Lsn";
/// On a read: serve it only from a server on that timeline that has replayed that LSN.
pub const MIN_LSN: &str = "X-Fleet-Min-Lsn";

/// The read's `X-Fleet-Min-Lsn`, if any.
#[derive(Debug)]
pub struct MinLsn(pub Option<Token>);

impl FromRequest for MinLsn {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let parsed = req.headers().get(MIN_LSN).map(|value| {
            value.to_str().ok().and_then(parse_token).ok_or_else(|| {
                ApiError::InvalidToken(format!(
                    "{MIN_LSN} must be a token as {LSN} gives it: <timeline>/<LSN>, e.g. 2/0/16B3740"
                ))
            })
        });
        ready(parsed.transpose().map(MinLsn))
    }
}

/// The header of a response whose data came from the primary.
pub fn from_primary() -> (&'static str, &'static str) {
    (SERVED_BY, "primary")
}

/// Marks a response as served by `served_by`.
pub fn served_by(response: &mut HttpResponseBuilder, served_by: &ServedBy) {
    response.insert_header((SERVED_BY, served_by.to_string()));
}

/// Marks a write's response: served by the primary, with its LSN when known.
pub fn written(response: &mut HttpResponseBuilder, lsn: Option<Token>) {
    served_by(response, &ServedBy::Primary);
    if let Some(lsn) = lsn {
        response.insert_header((LSN, lsn.to_string()));
    }
}
