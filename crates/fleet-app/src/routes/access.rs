//! What an endpoint may use of the database, as its row of the route table says ([`Access`]), and the
//! handles that give exactly that: a handler of an [`Access::Primary`] endpoint takes an [`OnPrimary`],
//! one of an [`Access::Replica`] endpoint an [`OnReplica`]. A handler that asks for a handle its row
//! does not grant answers 500 (a bug, logged). Who served a successful response (`X-Fleet-Served-By`)
//! is stamped here, in one place ([`stamp_served_by`]).

use std::future::{ready, Ready};
use std::ops::Deref;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::TryIntoHeaderPair;
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};

use super::AppState;
use crate::db::{self, DbError, Read, ServedBy};
use crate::errors::ApiError;

/// `primary` or `replica:<member>`, on every successful response that read or wrote data.
pub const SERVED_BY: &str = "X-Fleet-Served-By";

/// Where an endpoint's queries go (`X-Fleet-Served-By` says where they went).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Touches no database.
    None,
    /// Writes, locks (`SELECT … FOR UPDATE`), the lab and health: `DATABASE_URL`.
    Primary,
    /// Reads that may be a little behind, or name their `X-Fleet-Min-Lsn`: `DATABASE_READ_URL` when set.
    Replica,
}

/// The database on the primary, for a handler of an [`Access::Primary`] endpoint.
#[derive(Debug)]
pub struct OnPrimary(web::Data<AppState>);

impl Deref for OnPrimary {
    type Target = db::Primary;

    fn deref(&self) -> &db::Primary {
        &self.0.primary
    }
}

impl FromRequest for OnPrimary {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(granted(req, Access::Primary).map(OnPrimary))
    }
}

/// The database's reads, for a handler of an [`Access::Replica`] endpoint.
#[derive(Debug)]
pub struct OnReplica {
    state: web::Data<AppState>,
    req: HttpRequest,
}

impl OnReplica {
    /// What `read` found; who served it is kept for `X-Fleet-Served-By`.
    pub async fn read<T>(
        &self,
        read: impl AsyncFnOnce(&db::Replica) -> Result<Read<T>, DbError>,
    ) -> Result<T, DbError> {
        let read = read(&self.state.replica).await?;
        self.req.extensions_mut().insert(read.served_by);
        Ok(read.value)
    }
}

impl FromRequest for OnReplica {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(granted(req, Access::Replica).map(|state| OnReplica { state, req: req.clone() }))
    }
}

/// The app state, if the route table marks the endpoint being served `access`.
fn granted(req: &HttpRequest, access: Access) -> Result<web::Data<AppState>, ApiError> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    match (req.app_data::<Access>(), state) {
        (Some(&marked), Some(state)) if marked == access => Ok(state),
        (marked, _) => {
            tracing::error!(
                http.route = req.match_pattern().as_deref(),
                route.access = ?marked,
                handler.access = ?access,
                "a handler asks for database access its row of the route table does not grant"
            );
            Err(ApiError::Internal)
        }
    }
}

/// Stamps `X-Fleet-Served-By` on a successful response of an endpoint marked `access`: `primary` for
/// [`Access::Primary`], and for [`Access::Replica`] whoever served the handler's read.
pub(super) async fn stamp_served_by(
    access: Access,
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let mut res = next.call(req).await?;
    if res.status().is_success() {
        let served_by = match access {
            Access::None => None,
            Access::Primary => Some(ServedBy::Primary),
            Access::Replica => res.request().extensions_mut().remove::<ServedBy>(),
        };
        if let Some(Ok((name, value))) = served_by.map(|by| (SERVED_BY, by.to_string()).try_into_pair()) {
            res.headers_mut().insert(name, value);
        }
    }
    Ok(res)
}
