//! A TCP relay between pullgate and the real upstream that misbehaves on command: it passes
//! bytes through untouched (TLS included, so the upstream's certificate still verifies) until
//! told to cut connections once they have carried a number of bytes towards pullgate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::rt;

/// What the relay does to the upstream -> pullgate direction of each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relay everything.
    Pass,
    /// Close the next `times` connections once they have relayed `bytes` bytes towards
    /// pullgate (mid-body for any large blob). `usize::MAX` cuts every connection.
    CutAfter { bytes: u64, times: usize },
    /// Relay everything, pausing this long after each chunk (at most 64 KiB): a slow upstream.
    Slow { pause_ms: u64 },
}

struct State {
    fault: Mutex<Fault>,
    cuts: AtomicUsize,
}

/// A running relay on 127.0.0.1; stops on Drop.
pub struct Relay {
    port: u16,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays 127.0.0.1:<new port> to 127.0.0.1:`target_port`.
    pub fn start(target_port: u16) -> Relay {
        let listener =
            super::block_on(async { TcpListener::bind("127.0.0.1:0").await }).expect("relay bind");
        let port = listener.local_addr().expect("relay addr").port();
        let state = Arc::new(State {
            fault: Mutex::new(Fault::Pass),
            cuts: AtomicUsize::new(0),
        });
        let shared = Arc::clone(&state);
        let accept = rt().spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    if let Ok(upstream) = TcpStream::connect(("127.0.0.1", target_port)).await {
                        relay(client, upstream, state).await;
                    }
                });
            }
        });
        Relay {
            port,
            state,
            accept,
        }
    }

    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// The relay as an upstream URL (same host as the upstream's certificate names).
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, upstream: TcpStream, state: Arc<State>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let requests = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
    });
    let mut relayed: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match upstream_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let fault = *state.fault.lock().unwrap();
        if let Fault::Slow { pause_ms } = fault {
            tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
        }
        let limit = match fault {
            Fault::CutAfter { bytes, times } if times > 0 => Some(bytes),
            _ => None,
        };
        if let Some(limit) = limit.filter(|l| relayed + n as u64 > *l) {
            let keep = (limit - relayed.min(limit)) as usize;
            let _ = client_write.write_all(&buf[..keep]).await;
            let mut fault = state.fault.lock().unwrap();
            if let Fault::CutAfter { times, .. } = &mut *fault {
                if *times != usize::MAX {
                    *times = times.saturating_sub(1);
                }
            }
            state.cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if client_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
        relayed += n as u64;
    }
    requests.abort();
}
