//! Mutual authentication of a fresh connection with the deployment secret.
//!
//! The server opens with a random nonce; the client answers with its own nonce and
//! `HMAC-SHA256(secret, "x2v-transfer/1 client" | server_nonce | client_nonce)`; the server checks it in
//! constant time and proves itself with the same construction under the `server` label. The secret never
//! crosses the wire and a recorded exchange cannot be replayed against a new nonce.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use x2v_core::ErrorKind;

use crate::conn::{Ctx, Stream};
use crate::error::{Result, TransferError};
use crate::wire::{Frame, read_frame, write_frame};

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// The per-deployment shared secret. Its `Debug` output is redacted.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps a secret of at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(TransferError::Invalid(format!(
                "the transfer secret must be at least {MIN_SECRET_LEN} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(Secret(bytes))
    }

    fn mac(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(label);
        m.update(a);
        m.update(b);
        m
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

const CLIENT: &[u8] = b"x2v-transfer/1 client";
const SERVER: &[u8] = b"x2v-transfer/1 server";

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rng().fill_bytes(&mut n);
    n
}

/// What the server told the client about itself.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub host_id: [u8; 16],
    pub shm: Option<String>,
}

/// Server side. On a wrong secret the peer gets an `Error` frame and the caller an `Unauthenticated`.
pub fn accept<S: Stream + ?Sized>(
    s: &mut S,
    secret: &Secret,
    host_id: [u8; 16],
    shm: Option<String>,
    ctx: &Ctx,
) -> Result<()> {
    let server_nonce = nonce();
    write_frame(s, &Frame::Hello { nonce: server_nonce, host_id, shm }, ctx, "handshake")?;
    let (client_nonce, mac) = match read_frame(s, ctx, "handshake")? {
        Frame::Auth { nonce, mac } => (nonce, mac),
        other => {
            return Err(TransferError::protocol(
                &ctx.peer,
                format!("expected Auth, got {}", other.name()),
            ));
        }
    };
    if secret.mac(CLIENT, &server_nonce, &client_nonce).verify_slice(&mac).is_err() {
        let message = "authentication failed: wrong transfer secret".to_string();
        let _ = write_frame(
            s,
            &Frame::Error { kind: ErrorKind::Unauthenticated, message },
            ctx,
            "handshake",
        );
        return Err(TransferError::Unauthenticated {
            peer: ctx.peer.clone(),
            reason: "client MAC mismatch".into(),
        });
    }
    let mac = secret.mac(SERVER, &client_nonce, &server_nonce).finalize().into_bytes().into();
    write_frame(s, &Frame::AuthOk { mac }, ctx, "handshake")
}

/// Client side: returns what the authenticated server advertised.
pub fn connect<S: Stream + ?Sized>(s: &mut S, secret: &Secret, ctx: &Ctx) -> Result<PeerInfo> {
    let (server_nonce, info) = match read_frame(s, ctx, "handshake")? {
        Frame::Hello { nonce, host_id, shm } => (nonce, PeerInfo { host_id, shm }),
        other => {
            return Err(TransferError::protocol(
                &ctx.peer,
                format!("expected Hello, got {}", other.name()),
            ));
        }
    };
    let client_nonce = nonce();
    let mac = secret.mac(CLIENT, &server_nonce, &client_nonce).finalize().into_bytes().into();
    write_frame(s, &Frame::Auth { nonce: client_nonce, mac }, ctx, "handshake")?;
    match read_frame(s, ctx, "handshake")? {
        Frame::AuthOk { mac } => {
            if secret.mac(SERVER, &client_nonce, &server_nonce).verify_slice(&mac).is_err() {
                return Err(TransferError::Unauthenticated {
                    peer: ctx.peer.clone(),
                    reason: "server MAC mismatch: the peer does not hold our secret".into(),
                });
            }
            Ok(info)
        }
        Frame::Error { message, .. } => {
            Err(TransferError::Unauthenticated { peer: ctx.peer.clone(), reason: message })
        }
        other => Err(TransferError::protocol(
            &ctx.peer,
            format!("expected AuthOk, got {}", other.name()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::conn::CancelFlag;

    fn ctx() -> Ctx {
        Ctx::new("test-peer", Instant::now() + Duration::from_secs(30), CancelFlag::default())
    }

    fn run(server_secret: &[u8], client_secret: &[u8]) -> (Result<()>, Result<PeerInfo>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let ss = Secret::new(server_secret).unwrap();
        let cs = Secret::new(client_secret).unwrap();
        let server = std::thread::spawn(move || {
            accept(&mut a, &ss, [7; 16], Some("shm-name".into()), &ctx())
        });
        let client = connect(&mut b, &cs, &ctx());
        (server.join().unwrap(), client)
    }

    #[test]
    fn matching_secrets_authenticate_both_ways() {
        let (s, c) = run(b"0123456789abcdef-secret", b"0123456789abcdef-secret");
        s.unwrap();
        let info = c.unwrap();
        assert_eq!(info.host_id, [7; 16]);
        assert_eq!(info.shm.as_deref(), Some("shm-name"));
    }

    #[test]
    fn wrong_secret_is_rejected_on_both_sides() {
        let (s, c) = run(b"0123456789abcdef-secret", b"0123456789abcdef-other!");
        assert!(matches!(s, Err(TransferError::Unauthenticated { .. })));
        let err = c.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(err.to_string().contains("wrong transfer secret"), "{err}");
    }

    #[test]
    fn short_secrets_and_debug_leaks_are_refused() {
        assert!(Secret::new(b"short".to_vec()).is_err());
        let s = Secret::new(b"0123456789abcdef".to_vec()).unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }
}
