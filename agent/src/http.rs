//! A small HTTP/1.1 client for the engine's endpoints (`/metrics`, `/v1/models`, TensorRT-LLM's
//! `/kv_cache_events`): plain `http://`, a deadline per request, and a cap on the body size.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest response body read (a vLLM `/metrics` page is tens of KiB; a TRT-LLM event drain can be large).
const BODY_LIMIT: usize = 64 << 20;

/// Why a request gave no usable body.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not a plain `http://` URL.
    #[error("bad URL `{url}`: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Connecting, sending or receiving failed.
    #[error("request to {url} failed: {reason}")]
    Failed {
        /// The URL.
        url: String,
        /// The underlying error.
        reason: String,
    },
    /// No complete answer within the deadline.
    #[error("request to {url} timed out after {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The server answered with a status other than 2xx.
    #[error("{url} answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
}

/// A reusable client (keeps connections alive between scrapes).
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    /// A client whose requests each end within `timeout`.
    pub fn new(timeout: Duration) -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        HttpClient { client: Client::builder(TokioExecutor::new()).build(connector), timeout }
    }

    /// `GET url`: the body of a 2xx answer.
    pub async fn get(&self, url: &str) -> Result<Bytes, HttpError> {
        self.send(Method::GET, url, Bytes::new()).await
    }

    /// `POST url` with a JSON body: the body of a 2xx answer.
    pub async fn post_json(&self, url: &str, body: Bytes) -> Result<Bytes, HttpError> {
        self.send(Method::POST, url, body).await
    }

    async fn send(&self, method: Method, url: &str, body: Bytes) -> Result<Bytes, HttpError> {
        let uri: Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| HttpError::BadUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        if uri.scheme_str() != Some("http") {
            return Err(HttpError::BadUrl {
                url: url.to_owned(),
                reason: "only http:// is supported".to_owned(),
            });
        }
        let mut request = Request::builder().method(method).uri(uri);
        if !body.is_empty() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| HttpError::BadUrl { url: url.to_owned(), reason: e.to_string() })?;
        let failed = |reason: String| HttpError::Failed { url: url.to_owned(), reason };
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| failed(e.to_string()))?;
            let status = response.status();
            if !status.is_success() {
                return Err(HttpError::Status { url: url.to_owned(), status: status.as_u16() });
            }
            let body = Limited::new(response.into_body(), BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(body.to_bytes())
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout { url: url.to_owned(), timeout: self.timeout })?
    }
}

/// `base` with its path replaced by `path` (`http://h:8000/metrics` + `/v1/models`).
pub fn sibling_url(base: &str, path: &str) -> Option<String> {
    let uri: Uri = base.parse().ok()?;
    let authority = uri.authority()?;
    Some(format!("{}://{}{}", uri.scheme_str()?, authority, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_urls_keep_scheme_and_authority() {
        assert_eq!(
            sibling_url("http://h:8000/metrics", "/v1/models").as_deref(),
            Some("http://h:8000/v1/models")
        );
        assert_eq!(sibling_url("http://h", "/x").as_deref(), Some("http://h/x"));
        assert_eq!(sibling_url("not a url", "/x"), None);
    }

    #[tokio::test]
    async fn https_and_garbage_are_rejected_without_a_connection() {
        let client = HttpClient::new(Duration::from_secs(1));
        assert!(matches!(client.get("https://example.invalid/").await, Err(HttpError::BadUrl { .. })));
        assert!(matches!(client.get("::").await, Err(HttpError::BadUrl { .. })));
    }
}
