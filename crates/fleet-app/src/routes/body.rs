//! `JsonBody<T>`: the request body parsed as JSON whatever the Content-Type says, within
//! `BODY_LIMIT_BYTES`, with every failure an `ApiError`.

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::error::Category;

use super::AppState;
use crate::errors::ApiError;

/// A JSON request body. Unknown fields are ignored, as the seed's clients send extras.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = req.app_data::<web::Data<AppState>>().map_or(usize::MAX, |state| state.body_limit_bytes);
        let declared = req
            .headers()
            .get(actix_web::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            let too_large =
                || ApiError::PayloadTooLarge(format!("request body is larger than {limit} bytes"));
            if declared.is_some_and(|len| len > limit) {
                return Err(too_large());
            }
            let mut body = web::BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk =
                    chunk.map_err(|e| ApiError::InvalidRequest(format!("could not read the body: {e}")))?;
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            parse(&body).map(JsonBody)
        })
    }
}

/// Every body is a JSON object: serde would also build a struct from an array (`["k"]`), which the
/// contract refuses.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let first = body.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first.is_some_and(|&b| b != b'{') && serde_json::from_slice::<IgnoredAny>(body).is_ok() {
        return Err(ApiError::InvalidRequest("the body must be a JSON object".to_owned()));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        Category::Data => ApiError::InvalidRequest(format!("invalid request body: {e}")),
        Category::Syntax | Category::Eof | Category::Io => ApiError::InvalidJson(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Key {
        #[expect(dead_code, reason = "only its presence is tested")]
        key: String,
    }

    #[test]
    fn syntax_errors_are_invalid_json_and_shape_errors_invalid_request() {
        assert_eq!(parse::<Key>(b"{").unwrap_err().code(), "invalid_json");
        assert_eq!(parse::<Key>(b"").unwrap_err().code(), "invalid_json");
        assert_eq!(parse::<Key>(br#"{"key": 1}"#).unwrap_err().code(), "invalid_request");
        let missing = parse::<Key>(b"{}").unwrap_err();
        assert_eq!(missing.code(), "invalid_request");
        assert!(missing.to_string().contains("key"), "{missing}");
        assert!(parse::<Key>(br#"{"key": "k", "extra": true}"#).is_ok());
        let array = parse::<Key>(br#" ["k"]"#).unwrap_err();
        assert_eq!(
            (array.code(), array.to_string().as_str()),
            ("invalid_request", "the body must be a JSON object")
        );
        assert_eq!(parse::<Key>(b"[").unwrap_err().code(), "invalid_json");
    }
}
