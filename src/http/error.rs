//! The API's error type: a status and `{"error": "..."}`. Internal detail is logged where it
//! happens; the message sent says what the caller can act on.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An API failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing or wrong `Authorization: Bearer`.
    #[error("missing or invalid api key")]
    Unauthorized,
    /// A browser reached the server-to-server API.
    #[error("requests with an Origin header are refused: this API is for servers only")]
    OriginRefused,
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The request body is over the API's limit.
    #[error("request body is larger than {limit} bytes")]
    TooLarge {
        /// The limit, bytes.
        limit: usize,
    },
    /// The request body is not declared as JSON.
    #[error("the request body must be JSON (Content-Type: application/json)")]
    NotJson,
    /// No such session.
    #[error("no live session for {0}")]
    NotFound(String),
    /// A ticket that is unknown, used or expired.
    #[error("ticket is invalid or expired")]
    BadTicket,
    /// The user has the maximum number of pages, none of them an unused prebind.
    #[error("too many pages for this user")]
    TooManyPages,
    /// The daemon is full.
    #[error("the daemon holds its maximum number of user sessions")]
    TooManyUsers,
    /// The XMPP server refused the credentials.
    #[error("login refused: {0}")]
    LoginRefused(String),
    /// The XMPP server could not be reached or failed.
    #[error("upstream failure: {0}")]
    Upstream(String),
    /// The login did not finish in time.
    #[error("upstream login timed out")]
    Timeout,
    /// The daemon is stopping.
    #[error("the daemon is stopping; try again shortly")]
    Stopping,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::OriginRefused | ApiError::BadTicket => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooManyUsers | ApiError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyPages => StatusCode::TOO_MANY_REQUESTS,
            ApiError::LoginRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// A login that failed (SPEC §3): refused credentials 422 (the caller's to fix), a login over
/// time 504, anything else upstream 502.
impl From<crate::session::LoginFailure> for ApiError {
    fn from(f: crate::session::LoginFailure) -> ApiError {
        use crate::session::LoginFailure as F;
        match f {
            F::AuthFailed(_) => ApiError::LoginRefused(f.to_string()),
            F::Timeout(_) => ApiError::Timeout,
            F::Unreachable(_) | F::Refused(_) | F::Damaged | F::Ended => {
                ApiError::Upstream(f.to_string())
            }
        }
    }
}

/// An unreadable JSON body: 413 over the size limit, 415 without a JSON content type, 400
/// otherwise (syntax, or fields that do not fit).
impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge {
                limit: super::api::BODY_LIMIT,
            },
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::NotJson,
            _ => ApiError::BadRequest(e.body_text()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() });
        (self.status(), Json(body)).into_response()
    }
}
