//! `JsonBody<T>`: a body of a few small fields parsed as JSON whatever the Content-Type says, within
//! 64 KiB, with every failure an `ApiError`; and what other body extractors share: reading a body within
//! its limit, its deadline and the node's [`BodyBudget`], parsing it with a serde seed, CPU work off the
//! worker. An error names the field and the rule it broke, never the value the client sent (which may be
//! megabytes, and which serde would quote whole).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Payload;
use actix_web::web::Bytes;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny};
use serde_json::error::Category;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};

use super::AppState;
use crate::errors::ApiError;

/// A JSON request body of a few small fields, at most [`SMALL_BODY_BYTES`]. Unknown fields are ignored:
/// existing clients send extra ones.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = read_body(req, payload, BodySize::Small);
        Box::pin(async move { parse(&body.await?.bytes).map(JsonBody) })
    }
}

/// Bodies up to this size are read without drawing on the [`BodyBudget`]: a thousand at once are 64 MiB.
/// It is also the limit of a body of a few small fields ([`BodySize::Small`]).
const SMALL_BODY_BYTES: usize = 64 * 1024;
/// The longest error message a body gets: serde's messages name a field and a rule, but one that quoted
/// a value would be cut here.
const MAX_MESSAGE_CHARS: usize = 200;
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

    /// Waits for `bytes` of the budget, unless the body is small, for at most `wait` (then 503
    /// `body_budget_busy`).
    async fn reserve(&self, bytes: usize, wait: Duration) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        if bytes <= SMALL_BODY_BYTES {
            return Ok(None);
        }
        // At most the limit's share: never more than the budget holds.
        let kib = u32::try_from(kib(bytes)).unwrap_or(u32::MAX);
        let share = timeout(wait, Arc::clone(&self.kib).acquire_many_owned(kib)).await;
        let share = share.map_err(|_| ApiError::BodyBudgetBusy)?;
        Ok(Some(share.expect("the budget is never closed")))
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

/// Which limit a route's body has.
#[derive(Debug, Clone, Copy)]
pub(super) enum BodySize {
    /// A few small fields: [`SMALL_BODY_BYTES`] (or `BODY_LIMIT_BYTES`, if lower).
    Small,
    /// Bulk rows: `BODY_LIMIT_BYTES`.
    Large,
}

/// The whole body, within its limit (413 beyond, before reading it when Content-Length says so), once
/// the node's [`BodyBudget`] has room for it (503 `body_budget_busy` after `BODY_READ_TIMEOUT_MS`),
/// arrived within `BODY_READ_TIMEOUT_MS` of the time it was read (408 beyond; the wait for the budget
/// does not count). Its buffer is allocated once, at the declared length.
pub(super) fn read_body(
    req: &HttpRequest,
    payload: &mut Payload,
    size: BodySize,
) -> impl Future<Output = Result<Body, ApiError>> + 'static {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let mut payload = payload.take();
    async move {
        let Some(state) = state else {
            tracing::error!("the app state is not registered");
            return Err(ApiError::Internal);
        };
        let limit = match size {
            BodySize::Small => SMALL_BODY_BYTES.min(state.body_limit_bytes),
            BodySize::Large => state.body_limit_bytes,
        };
        let too_large = || ApiError::PayloadTooLarge(format!("request body is larger than {limit} bytes"));
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let (budget, wait) = (&state.body_budget, state.body_read_timeout);
        let timed_out = || ApiError::BodyTimeout { ms: wait.as_millis() as u64 };
        let mut share = budget.reserve(declared.unwrap_or(0), wait).await?;
        let mut deadline = Instant::now() + wait;
        let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0));
        while let Some(chunk) = timeout_at(deadline, payload.next()).await.map_err(|_| timed_out())? {
            let chunk =
                chunk.map_err(|e| ApiError::InvalidRequest(format!("could not read the body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            if share.is_none() && body.len() + chunk.len() > SMALL_BODY_BYTES {
                // Sent without a length, and no longer small: it may grow to the limit.
                let waiting = Instant::now();
                share = budget.reserve(limit, wait).await?;
                deadline += waiting.elapsed();
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
/// shape `invalid_request`, its message prefixed with the field's path (`amount: …`, `data[3]: …`).
/// Every body is a JSON object: serde would also build a struct from an array (`["k"]`), which the
/// contract refuses.
pub(super) fn parse_with<'de, S: DeserializeSeed<'de>>(
    body: &'de [u8],
    seed: S,
) -> Result<S::Value, ApiError> {
    let first = body.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first.is_some_and(|&b| b != b'{') && serde_json::from_slice::<IgnoredAny>(body).is_ok() {
        return Err(ApiError::InvalidRequest("the body must be a JSON object".to_owned()));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(&mut deserializer, &mut track);
    let value = seed.deserialize(tracked).and_then(|value| deserializer.end().map(|()| value));
    value.map_err(|e| {
        let message = match track.path().to_string().as_str() {
            "." => e.to_string(),
            path => format!("{path}: {e}"),
        };
        let message = message.chars().take(MAX_MESSAGE_CHARS).collect();
        match e.classify() {
            Category::Data => ApiError::InvalidRequest(message),
            Category::Syntax | Category::Eof | Category::Io => ApiError::InvalidJson(message),
        }
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
        let wrong_type = parse::<Key>(br#"{"key": 1}"#).unwrap_err();
        assert_eq!(wrong_type.code(), "invalid_request");
        assert!(wrong_type.to_string().starts_with("key: invalid type: integer `1`"), "{wrong_type}");
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
