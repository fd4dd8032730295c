//! [`Optional`]: a request header that may be absent, read by its [`Header`] (a 400 if present and not
//! readable).

use std::fmt::Debug;
use std::future::{ready, Ready};

use actix_web::dev::Payload;
use actix_web::http::header::HeaderValue;
use actix_web::{FromRequest, HttpRequest};

use crate::errors::ApiError;

/// A request header a handler may take: its name, and how its value is read.
pub trait Header {
    const NAME: &'static str;
    type Value: Debug;

    /// The header's value, or the 400 that explains what it must be.
    fn parse(value: &HeaderValue) -> Result<Self::Value, ApiError>;
}

/// `H`'s value if the request has the header.
#[derive(Debug)]
pub struct Optional<H: Header>(pub Option<H::Value>);

impl<H: Header> FromRequest for Optional<H> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(req.headers().get(H::NAME).map(H::parse).transpose().map(Optional))
    }
}
