//! A TCP proxy that misbehaves on purpose: it corrupts, truncates, resets, delays, blackholes or stalls
//! the bytes flowing in one direction once a given number of bytes went through.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Forward faithfully.
    Pass,
    /// Flip one bit of the byte at this offset.
    Corrupt(u64),
    /// Forward this many bytes, then close both sides cleanly.
    Truncate(u64),
    /// Forward this many bytes, then reset both sides.
    Reset(u64),
    /// Sleep this long before forwarding each read.
    Delay(Duration),
    /// Forward this many bytes, then swallow the rest while keeping the connection open.
    Blackhole(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to server (a push's data).
    Up,
    /// Server to client (a pull's data).
    Down,
}

pub struct Proxy {
    pub addr: SocketAddr,
    forwarded: Arc<(Mutex<u64>, Condvar)>,
    pub faulted: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(target: SocketAddr, fault: Fault, dir: Dir) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let forwarded = Arc::new((Mutex::new(0u64), Condvar::new()));
        let faulted = Arc::new(AtomicU64::new(0));
        let (fw, fl) = (forwarded.clone(), faulted.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else { return };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (up, down) = match dir {
                    Dir::Up => (fault, Fault::Pass),
                    Dir::Down => (Fault::Pass, fault),
                };
                let (fw1, fl1, fw2, fl2) = (fw.clone(), fl.clone(), fw.clone(), fl.clone());
                std::thread::spawn(move || pump(client, server, up, &fw1, &fl1, dir == Dir::Up));
                std::thread::spawn(move || pump(s2, c2, down, &fw2, &fl2, dir == Dir::Down));
            }
        });
        Proxy { addr, forwarded, faulted }
    }

    /// Blocks until at least `n` bytes went through in the faulty direction.
    pub fn wait_forwarded(&self, n: u64, timeout: Duration) -> bool {
        let (m, cv) = &*self.forwarded;
        let got = cv.wait_timeout_while(m.lock().unwrap(), timeout, |f| *f < n).unwrap();
        *got.0 >= n
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    fault: Fault,
    fw: &(Mutex<u64>, Condvar),
    faulted: &AtomicU64,
    count: bool,
) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut seen = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let limit = match fault {
            Fault::Truncate(at) | Fault::Reset(at) | Fault::Blackhole(at) => Some(at),
            _ => None,
        };
        let mut send = n;
        if let Some(at) = limit
            && seen + n as u64 >= at
        {
            send = (at - seen.min(at)) as usize;
        }
        if let Fault::Corrupt(at) = fault
            && (seen..seen + n as u64).contains(&at)
        {
            chunk[(at - seen) as usize] ^= 0x01;
            faulted.fetch_add(1, Ordering::SeqCst);
        }
        if let Fault::Delay(d) = fault {
            std::thread::sleep(d);
        }
        if to.write_all(&chunk[..send]).is_err() {
            break;
        }
        seen += send as u64;
        if count {
            let (m, cv) = fw;
            *m.lock().unwrap() += send as u64;
            cv.notify_all();
        }
        if send < n {
            faulted.fetch_add(1, Ordering::SeqCst);
            match fault {
                Fault::Truncate(_) => {
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                }
                Fault::Reset(_) => {
                    for s in [&to, &from] {
                        let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                        let _ = s.shutdown(Shutdown::Read);
                    }
                }
                _ => {
                    // Blackhole: keep reading and dropping until the peer gives up.
                    while matches!(from.read(&mut buf), Ok(n) if n > 0) {}
                }
            }
            break;
        }
    }
    // Either side gone ends the whole connection (the other pump holds clones, so close explicitly).
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
