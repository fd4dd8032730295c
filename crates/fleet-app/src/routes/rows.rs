//! `BulkRows`: the rows of a `/api/bulk-insert` body, checked while it is parsed. Reading stops at the
//! first row past `BULK_MAX_ROWS`, or longer than `BULK_MAX_ROW_BYTES`, so a body of millions of tiny
//! rows never becomes millions of strings: a request holds its body (≤ `BODY_LIMIT_BYTES`) and at most
//! `BULK_MAX_ROWS` rows of it.

use std::cell::Cell;
use std::fmt;

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;

use super::body::{off_worker, parse_with, read_body, BodySize};
use super::{no_nul, AppState};
use crate::errors::ApiError;

/// The strings of `{"data": ["…", …]}`, at most `BULK_MAX_ROWS` of at most `BULK_MAX_ROW_BYTES` each,
/// none holding NUL. Other fields are ignored. Holds the body's share of the node's body budget (see
/// `BodyBudget`) as long as the rows live.
#[derive(Debug)]
pub struct BulkRows {
    pub rows: Vec<String>,
    pub share: Option<OwnedSemaphorePermit>,
}

/// What a body may hold.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_rows: usize,
    max_row_bytes: usize,
}

impl FromRequest for BulkRows {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limits = req.app_data::<web::Data<AppState>>().map_or(
            Limits { max_rows: usize::MAX, max_row_bytes: usize::MAX },
            |state| Limits { max_rows: state.bulk_max_rows, max_row_bytes: state.bulk_max_row_bytes },
        );
        let body = read_body(req, payload, BodySize::Large);
        Box::pin(async move {
            let body = body.await?;
            let (bytes, share) = (body.bytes, body.share);
            // Parsing megabytes takes a while: off the worker.
            let rows = off_worker(move || parse(&bytes, limits)).await??;
            Ok(BulkRows { rows, share })
        })
    }
}

fn parse(body: &[u8], limits: Limits) -> Result<Vec<String>, ApiError> {
    // A refusal is raised as a serde error (to stop parsing) and kept here, so it keeps its status.
    let refused = Cell::new(None);
    let rows = parse_with(body, Body { limits, refused: &refused });
    match refused.take() {
        Some(refusal) => Err(refusal),
        None => rows,
    }
}

/// The body's top level: an object, whose `data` field is read by [`Rows`].
struct Body<'a> {
    limits: Limits,
    refused: &'a Cell<Option<ApiError>>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Data,
    #[serde(other)]
    Other,
}

impl<'de> DeserializeSeed<'de> for Body<'_> {
    type Value = Vec<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Body<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with a `data` array of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut data = None;
        while let Some(field) = map.next_key()? {
            match field {
                Field::Data if data.is_some() => return Err(de::Error::duplicate_field("data")),
                Field::Data => {
                    data = Some(map.next_value_seed(Rows { limits: self.limits, refused: self.refused })?)
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        data.ok_or_else(|| de::Error::missing_field("data"))
    }
}

/// The `data` array, refused at its first row past `max_rows`.
struct Rows<'a> {
    limits: Limits,
    refused: &'a Cell<Option<ApiError>>,
}

impl<'de> DeserializeSeed<'de> for Rows<'_> {
    type Value = Vec<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        // Not `deserialize_seq`: serde_json would refuse a string there by quoting it whole, without asking
        // this visitor (see `visit_str`).
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Rows<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of strings")
    }

    /// serde's default quotes the string whole, and it may be megabytes.
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(E::invalid_type(de::Unexpected::Other("string"), &self))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let Limits { max_rows, max_row_bytes } = self.limits;
        let mut rows = Vec::new();
        let row = |index| Row { index, max_bytes: max_row_bytes, refused: self.refused };
        while let Some(content) = seq.next_element_seed(row(rows.len()))? {
            if rows.len() == max_rows {
                return Err(refuse(
                    self.refused,
                    ApiError::PayloadTooLarge(format!(
                        "data holds more than {max_rows} rows; at most {max_rows} (BULK_MAX_ROWS) are allowed"
                    )),
                ));
            }
            rows.push(content);
        }
        Ok(rows)
    }
}

/// One row: a string of at most `max_bytes` bytes without NUL, checked before it is copied.
struct Row<'a> {
    index: usize,
    max_bytes: usize,
    refused: &'a Cell<Option<ApiError>>,
}

impl<'de> DeserializeSeed<'de> for Row<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for Row<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, content: &str) -> Result<Self::Value, E> {
        let (index, max) = (self.index, self.max_bytes);
        if content.len() > max {
            return Err(refuse(
                self.refused,
                ApiError::PayloadTooLarge(format!(
                    "data[{index}] is {} bytes long; at most {max} (BULK_MAX_ROW_BYTES) are allowed",
                    content.len()
                )),
            ));
        }
        no_nul(&format!("data[{index}]"), content).map_err(|e| refuse(self.refused, e))?;
        Ok(content.to_owned())
    }
}

/// Keeps `refusal` for [`parse`] and gives the deserializer an error that stops it.
fn refuse<E: de::Error>(refused: &Cell<Option<ApiError>>, refusal: ApiError) -> E {
    let message = refusal.to_string();
    refused.set(Some(refusal));
    E::custom(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_rows: 3, max_row_bytes: 4 };

    fn code(body: &str) -> String {
        parse(body.as_bytes(), LIMITS).unwrap_err().code().to_owned()
    }

    #[test]
    fn rows_within_the_limits_are_read_in_order_and_other_fields_ignored() {
        let rows = parse(br#"{"x": {"y": [1]}, "data": ["a", "\u00e9\u00e9", ""]}"#, LIMITS).unwrap();
        assert_eq!(rows, ["a", "éé", ""]);
    }

    #[test]
    fn a_row_past_the_count_or_the_length_is_413_naming_its_limit() {
        let err = parse(br#"{"data": ["a", "b", "c", "d"]}"#, LIMITS).unwrap_err();
        assert_eq!(err.code(), "payload_too_large");
        assert!(err.to_string().contains("at most 3 (BULK_MAX_ROWS)"), "{err}");
        let err = parse(br#"{"data": ["a", "hello"]}"#, LIMITS).unwrap_err();
        assert_eq!(err.code(), "payload_too_large");
        assert!(err.to_string().contains("data[1] is 5 bytes long; at most 4 (BULK_MAX_ROW_BYTES)"), "{err}");
        // Bytes, not characters: "éé" is four bytes, "ééé" six.
        assert!(parse(r#"{"data": ["éé"]}"#.as_bytes(), LIMITS).is_ok());
        assert_eq!(code(r#"{"data": ["ééé"]}"#), "payload_too_large");
    }

    #[test]
    fn the_first_refusal_stops_the_parse_even_in_a_body_broken_further_on() {
        assert_eq!(code(r#"{"data": ["a", "b", "c", "d", "#), "payload_too_large");
    }

    #[test]
    fn shape_errors_are_invalid_request_and_syntax_errors_invalid_json() {
        for body in [r#"{"data": "x"}"#, r#"{"data": ["a", 1]}"#, "{}", r#"{"data": [], "data": []}"#, "[]"] {
            assert_eq!(code(body), "invalid_request", "{body}");
        }
        assert_eq!(code(r#"{"data": ["a\u0000"]}"#), "invalid_request");
        assert_eq!(code(r#"{"data": ["a""#), "invalid_json");
        assert_eq!(code(r#"{"data": []} trailing"#), "invalid_json");
        let err = parse(br#"{"data": "a long string"}"#, LIMITS).unwrap_err().to_string();
        assert!(err.starts_with("data: invalid type: string, expected an array of strings"), "{err}");
        let err = parse(br#"{"data": ["a", 1]}"#, LIMITS).unwrap_err().to_string();
        assert!(err.starts_with("data[1]: invalid type: integer `1`, expected a string"), "{err}");
    }
}
