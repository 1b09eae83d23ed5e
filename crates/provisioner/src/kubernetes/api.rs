//! Bounded Kubernetes API calls and what their failures mean to an operator.
//!
//! Every call nestor makes goes through [`Kube::call`]: it is bounded by `api_timeout`, and a
//! failure names the verb and resource (`create pods in namespace agents`), so a 403 reads
//! as the RBAC rule that is missing and an unreachable API server as exactly that.

use std::future::Future;
use std::time::Duration;

use crate::ProvisionError;

/// A failed API call.
#[derive(Debug, Clone)]
pub enum KubeError {
    /// The API server answered with an error status.
    Status { verb: &'static str, resource: &'static str, ns: String, code: u16, reason: String, message: String },
    /// No answer: connection refused, TLS failure, DNS…
    Unreachable { verb: &'static str, resource: &'static str, server: String, detail: String },
    /// No answer within the bound.
    Timeout { verb: &'static str, resource: &'static str, server: String, after: Duration },
    /// Anything else (an answer nestor cannot read).
    Other { verb: &'static str, resource: &'static str, detail: String },
}

impl KubeError {
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
    pub fn is_gone(&self) -> bool {
        self.code() == Some(410)
    }
}

impl std::fmt::Display for KubeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KubeError::Status { verb, resource, ns, code: 403, message, .. } => write!(
                f,
                "nestor is not allowed to {verb} {resource} in namespace {ns:?} (Kubernetes answered 403 Forbidden: {message}); grant the verb \"{verb}\" on \"{resource}\" to nestor's identity (see deploy/kubernetes/rbac.yaml)"
            ),
            KubeError::Status { verb, resource, code: 401, .. } => write!(
                f,
                "the Kubernetes API server rejected nestor's credentials (401 Unauthorized) when it tried to {verb} {resource}; check provisioner.kubernetes.kubeconfig or the service account token"
            ),
            KubeError::Status { verb, resource, ns, code, reason, message } => {
                write!(f, "Kubernetes refused to {verb} {resource} in namespace {ns:?}: {code} {reason}: {message}")
            }
            KubeError::Unreachable { verb, resource, server, detail } => write!(
                f,
                "the Kubernetes API server at {server} is unreachable ({detail}) while trying to {verb} {resource}; check provisioner.kubernetes.kubeconfig and that the API server runs"
            ),
            KubeError::Timeout { verb, resource, server, after } => write!(
                f,
                "the Kubernetes API server at {server} did not answer within {after:?} while trying to {verb} {resource}"
            ),
            KubeError::Other { verb, resource, detail } => write!(f, "could not {verb} {resource}: {detail}"),
        }
    }
}

impl From<KubeError> for ProvisionError {
    fn from(e: KubeError) -> Self {
        match &e {
            KubeError::Status { code: 401 | 403, .. } => ProvisionError::Config(e.to_string()),
            KubeError::Status { code: 404, message, ns, .. } if message.starts_with(&format!("namespaces \"{ns}\"")) => {
                ProvisionError::Config(format!("{e} (the namespace does not exist: create it, or set provisioner.kubernetes.namespace)"))
            }
            KubeError::Status { code: 429, .. } | KubeError::Status { code: 500..=599, .. } => {
                ProvisionError::Unavailable { detail: e.to_string(), retry_after: Some(Duration::from_secs(5)) }
            }
            KubeError::Unreachable { .. } | KubeError::Timeout { .. } => {
                ProvisionError::Unavailable { detail: e.to_string(), retry_after: Some(Duration::from_secs(5)) }
            }
            KubeError::Status { .. } | KubeError::Other { .. } => ProvisionError::Start(e.to_string()),
        }
    }
}

/// The client plus what error messages need.
#[derive(Clone)]
pub struct Kube {
    pub client: kube::Client,
    pub ns: String,
    pub server: String,
    pub timeout: Duration,
}

/// The innermost cause of an error, for a short message (`Connection refused (os error 111)`).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl Kube {
    /// Run one API call, bounded, with its failure classified.
    pub async fn call<T>(
        &self,
        verb: &'static str,
        resource: &'static str,
        fut: impl Future<Output = kube::Result<T>>,
    ) -> Result<T, KubeError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(KubeError::Timeout { verb, resource, server: self.server.clone(), after: self.timeout }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(verb, resource, e)),
        }
    }

    pub fn classify(&self, verb: &'static str, resource: &'static str, e: kube::Error) -> KubeError {
        match e {
            kube::Error::Api(s) => KubeError::Status {
                verb,
                resource,
                ns: self.ns.clone(),
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.clone(),
            },
            e @ (kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::RustlsTls(_)) => {
                KubeError::Unreachable { verb, resource, server: self.server.clone(), detail: root_cause(&e) }
            }
            e @ kube::Error::Auth(_) => KubeError::Status {
                verb,
                resource,
                ns: self.ns.clone(),
                code: 401,
                reason: "Unauthorized".into(),
                message: root_cause(&e),
            },
            e => KubeError::Other { verb, resource, detail: e.to_string() },
        }
    }
}
