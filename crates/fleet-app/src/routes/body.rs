//! `JsonBody<T>`: the request body parsed as JSON whatever the Content-Type says, within
//! `BODY_LIMIT_BYTES`, with every failure an `ApiError`; and what other body extractors share: reading
//! a body within the node's [`BodyBudget`], parsing it with a serde seed, CPU work off the worker.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::web::Bytes;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny};
use serde_json::error::Category;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use crate::errors::ApiError;

/// A JSON request body. Unknown fields are ignored, as the seed's clients send extras.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = read_body(req, payload);
        Box::pin(async move { parse(&body.await?.bytes).map(JsonBody) })
    }
}

/// Bodies up to this size are read without drawing on the [`BodyBudget`]: a thousand at once are 64 MiB.
const SMALL_BODY_BYTES: usize = 64 * 1024;
/// How many maximum-size bodies (`BODY_LIMIT_BYTES`) a node holds at once.
const MAX_SIZE_BODIES_AT_ONCE: usize = 4;

/// The bytes of large bodies a node holds at once, shared by all its requests: 4 × `BODY_LIMIT_BYTES`.
/// A large body waits for its share before it is read (its bytes wait in the kernel meanwhile, which
/// slows its sender down), and a bulk insert holds the share until it is answered, as its parsed rows
/// are about as large. So however many clients send large bodies at once, a node's memory stays bounded.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    kib: Arc<Semaphore>,
}

impl BodyBudget {
    pub fn new(body_limit_bytes: usize) -> Self {
        let kib = kib(body_limit_bytes).saturating_mul(MAX_SIZE_BODIES_AT_ONCE).min(Semaphore::MAX_PERMITS);
        BodyBudget { kib: Arc::new(Semaphore::new(kib)) }
    }

    /// Waits for `bytes` of the budget, unless the body is small.
    async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        if bytes <= SMALL_BODY_BYTES {
            return None;
        }
        // At most the limit's share: never more than the budget holds.
        let kib = u32::try_from(kib(bytes)).unwrap_or(u32::MAX);
        Some(Arc::clone(&self.kib).acquire_many_owned(kib).await.expect("the budget is never closed"))
    }
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// A request body and its share of the node's [`BodyBudget`] (none for a small body).
#[derive(Debug)]
pub(super) struct Body {
    pub bytes: Bytes,
    pub share: Option<OwnedSemaphorePermit>,
}

/// The whole body, within `BODY_LIMIT_BYTES` (413 beyond, before reading it when Content-Length says
/// so), once the node's [`BodyBudget`] has room for it. Its buffer is allocated once, at the declared
/// length.
pub(super) fn read_body(
    req: &HttpRequest,
    payload: &mut Payload,
) -> impl Future<Output = Result<Body, ApiError>> + 'static {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let mut payload = payload.take();
    async move {
        let limit = state.as_ref().map_or(usize::MAX, |state| state.body_limit_bytes);
        let too_large = || ApiError::PayloadTooLarge(format!("request body is larger than {limit} bytes"));
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let budget = state.as_ref().map(|state| &state.body_budget);
        let reserve = async |bytes| match budget {
            Some(budget) => budget.reserve(bytes).await,
            None => None,
        };
        let mut share = reserve(declared.unwrap_or(0)).await;
        let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0));
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::InvalidRequest(format!("could not read the body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            if share.is_none() && body.len() + chunk.len() > SMALL_BODY_BYTES {
                // Sent without a length, and no longer small: it may grow to the limit.
                share = reserve(limit).await;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Body { bytes: body.freeze(), share })
    }
}

/// Runs `work` on actix's blocking thread pool: CPU work on megabytes (parsing, hashing) done on the
/// worker itself would hold up every other request the worker serves, their open transactions included.
pub(super) async fn off_worker<R: Send + 'static>(
    work: impl FnOnce() -> R + Send + 'static,
) -> Result<R, ApiError> {
    web::block(work).await.map_err(|e| {
        tracing::error!(error = %e, "blocking task failed");
        ApiError::Internal
    })
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    parse_with(body, PhantomData::<T>)
}

/// Parses `body` as one JSON value with `seed`: a syntax error is `invalid_json`, a value of the wrong
/// shape `invalid_request`. Every body is a JSON object: serde would also build a struct from an array
/// (`["k"]`), which the contract refuses.
pub(super) fn parse_with<'de, S: DeserializeSeed<'de>>(
    body: &'de [u8],
    seed: S,
) -> Result<S::Value, ApiError> {
    let first = body.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first.is_some_and(|&b| b != b'{') && serde_json::from_slice::<IgnoredAny>(body).is_ok() {
        return Err(ApiError::InvalidRequest("the body must be a JSON object".to_owned()));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = seed.deserialize(&mut deserializer).and_then(|value| deserializer.end().map(|()| value));
    value.map_err(|e| match e.classify() {
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
