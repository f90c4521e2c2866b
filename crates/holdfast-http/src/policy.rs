//! A tower layer that declares a replay policy for the requests it wraps.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use holdfast::ReplayPolicy;
use http::{Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::Handle;

/// Declares `policy` for every request of the service it wraps, before the
/// service runs: e.g. `ReplayPolicy::Error` on a route whose work must not
/// run twice (a payment), so a crash before its answer gets the next worker
/// to answer `500` instead of running it again.
///
/// ```no_run
/// use axum::{routing::post, Router};
/// use holdfast::ReplayPolicy;
/// let app: Router = Router::new().route(
///     "/pay",
///     post(|| async { "paid\n" }).layer(holdfast_http::ReplayPolicyLayer::new(ReplayPolicy::Error)),
/// );
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ReplayPolicyLayer {
    policy: ReplayPolicy,
}

impl ReplayPolicyLayer {
    pub fn new(policy: ReplayPolicy) -> ReplayPolicyLayer {
        ReplayPolicyLayer { policy }
    }
}

impl<S> Layer<S> for ReplayPolicyLayer {
    type Service = WithReplayPolicy<S>;

    fn layer(&self, inner: S) -> WithReplayPolicy<S> {
        WithReplayPolicy {
            inner,
            policy: self.policy,
        }
    }
}

/// The service [`ReplayPolicyLayer`] makes.
#[derive(Clone, Copy, Debug)]
pub struct WithReplayPolicy<S> {
    inner: S,
    policy: ReplayPolicy,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for WithReplayPolicy<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Without a handle (not served by this adapter) there is nothing to
        // declare to: the request runs as usual.
        let declared = match req.extensions().get::<Handle>() {
            Some(handle) => handle.replay_policy(self.policy),
            None => Ok(()),
        };
        match declared {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(e) => {
                // Running it undeclared could run it twice: refuse instead.
                tracing::warn!(error = %e, "could not declare a replay policy");
                let mut refused = Response::new(ResBody::default());
                *refused.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                Box::pin(std::future::ready(Ok(refused)))
            }
        }
    }
}
