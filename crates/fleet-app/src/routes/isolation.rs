//! `/api/test-isolation` (a lab endpoint): the anomaly catalogue run at one level or at all four.
//!
//! One level: `{"success": true, "level", "effectiveLevel", "serverLevel", "dirtyRead", …, "phenomena",
//! "scenarios", "duration", "container"}`. No level (`{}`, `{"level": null}` or no body at all): the
//! same objects, one per level in the order of `Level::ALL`, under `"levels"`.

use std::time::Instant;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::{success, JsonBody, OnPrimary};
use crate::db::isolation::Level;
use crate::errors::ApiError;

/// How much of an unknown level the error message quotes.
const QUOTED_CHARS: usize = 40;

#[derive(Debug, Deserialize)]
pub struct IsolationRequest {
    level: Option<String>,
}

pub async fn test_isolation(
    db: OnPrimary,
    request: HttpRequest,
    body: Result<JsonBody<IsolationRequest>, ApiError>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let level = match body {
        Ok(JsonBody(req)) => req.level,
        Err(ApiError::InvalidJson(_)) if has_no_body(&request) => None,
        Err(err) => return Err(err),
    };
    let levels = match level.as_deref() {
        None => Level::ALL.to_vec(),
        Some(name) => vec![parse_level(name)?],
    };
    let reports = db.test_isolation(&levels).await?;
    // One level: its report's fields next to the envelope's.
    let fields = match (level, reports.as_slice()) {
        (Some(_), [report]) => json!(report),
        _ => json!({ "levels": reports }),
    };
    Ok(HttpResponse::Ok().json(success(start, fields)))
}

/// A level by one of its four names; anything else is a 400 that lists them.
fn parse_level(name: &str) -> Result<Level, ApiError> {
    Level::parse(name).ok_or_else(|| {
        let valid: Vec<String> = Level::ALL.iter().map(|level| format!("\"{}\"", level.name())).collect();
        let quoted: String = name.chars().take(QUOTED_CHARS).collect();
        ApiError::InvalidRequest(format!(
            "level must be one of {} (any case, words separated by a space or \"_\"), got {quoted:?}",
            valid.join(", ")
        ))
    })
}

/// The request declared no body at all (`curl -X POST` sends none): that means "all four levels".
fn has_no_body(request: &HttpRequest) -> bool {
    let headers = request.headers();
    match headers.get(header::CONTENT_LENGTH) {
        Some(length) => length.as_bytes() == b"0",
        None => !headers.contains_key(header::TRANSFER_ENCODING),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_level_is_a_400_that_lists_the_four_names() {
        let err = parse_level("SNAPSHOT").unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        let message = err.to_string();
        for level in Level::ALL {
            assert!(message.contains(level.name()), "{message}");
        }
        assert!(message.contains("SNAPSHOT"), "{message}");
        assert_eq!(parse_level("repeatable_read").unwrap(), Level::RepeatableRead);
    }
}
