//! What the write endpoints share for idempotency: the `Idempotency-Key` header and turning a
//! [`Written`] result into a response (a replay answers with the stored status and body).

use actix_web::http::header::HeaderValue;
use actix_web::HttpResponse;
use serde_json::Value;

use super::consistency::LSN;
use super::header::Header;
use crate::db::idempotency::MAX_KEY_CHARS;
use crate::db::{Retried, Written};
use crate::errors::ApiError;

/// The header a client sets to make a write happen at most once.
pub const HEADER: &str = "Idempotency-Key";
/// Set on a response that replays the stored response of an earlier request with the same key.
const REPLAYED_HEADER: &str = "Idempotent-Replayed";

/// A write's `Idempotency-Key`: 1–255 visible ASCII characters.
#[derive(Debug)]
pub struct IdempotencyKeyHeader;

impl Header for IdempotencyKeyHeader {
    const NAME: &'static str = HEADER;
    type Value = String;

    fn parse(value: &HeaderValue) -> Result<String, ApiError> {
        parse(value.as_bytes())
    }
}

fn parse(value: &[u8]) -> Result<String, ApiError> {
    let valid = (1..=MAX_KEY_CHARS).contains(&value.len()) && value.iter().all(|b| b.is_ascii_graphic());
    if !valid {
        return Err(ApiError::InvalidRequest(format!(
            "{HEADER} must be 1 to {MAX_KEY_CHARS} visible ASCII characters"
        )));
    }
    Ok(String::from_utf8_lossy(value).into_owned())
}

/// The response to a write: the stored body when there is one (so the first answer and every replay are
/// identical), else `render` of the result; a replay carries `Idempotent-Replayed: true`. Either way it
/// carries the write's `X-Fleet-Lsn`, when known.
pub fn respond<T>(done: Retried<Written<T>>, render: impl Fn(&T, u32) -> Value) -> HttpResponse {
    let (mut response, body) = match done.value {
        Written::Fresh { value, stored } => {
            (HttpResponse::Ok(), stored.unwrap_or_else(|| render(&value, done.attempts)))
        }
        Written::Replayed(stored) => {
            let status = actix_web::http::StatusCode::from_u16(stored.status)
                .unwrap_or(actix_web::http::StatusCode::OK);
            let mut response = HttpResponse::build(status);
            response.insert_header((REPLAYED_HEADER, "true"));
            (response, stored.body)
        }
    };
    if let Some(lsn) = done.lsn {
        response.insert_header((LSN, lsn.to_string()));
    }
    response.json(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_to_255_visible_ascii_characters() {
        assert_eq!(parse(b"order-42").unwrap(), "order-42");
        assert!(parse(&[b'k'; 255]).is_ok());
        assert!(parse(&[b'k'; 256]).is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"with space").is_err());
        assert!(parse("é".as_bytes()).is_err());
    }
}
