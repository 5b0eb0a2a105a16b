//! The verbs side of the `rdma` feature: one RC queue pair per peer, the pool registered once.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::time::Instant;

use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    ExtendedCompletionQueue, GenericCompletionQueue, WorkCompletionStatus,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::{
    ExtendedQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
    SetScatterGatherEntry, WorkRequestFlags,
};

use super::Region;
use crate::error::{Result, TransferError};

fn err(what: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::TransportUnavailable { transport: "rdma", reason: format!("{what}: {e}") }
}

/// Names of the verbs devices on this host.
pub fn devices() -> Result<Vec<String>> {
    let list = DeviceList::new().map_err(|e| err("listing verbs devices", format!("{e:?}")))?;
    Ok(list.iter().map(|d| d.name()).collect())
}

/// What a peer needs to reach our queue pair and write into our registered pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    pub qp_number: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    pub rkey: u32,
    /// Virtual address of the pool's first byte in the owner's process (what RDMA WRITE targets).
    pub base: u64,
    pub len: u64,
}

impl ConnInfo {
    /// Fixed 48-byte little-endian encoding, carried over the authenticated control channel.
    pub fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0..4].copy_from_slice(&self.qp_number.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..24].copy_from_slice(&self.gid);
        b[24..28].copy_from_slice(&self.rkey.to_le_bytes());
        b[32..40].copy_from_slice(&self.base.to_le_bytes());
        b[40..48].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; 48]) -> ConnInfo {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        ConnInfo {
            qp_number: u32_at(0),
            psn: u32_at(4),
            gid: b[8..24].try_into().expect("16 bytes"),
            rkey: u32_at(24),
            base: u64_at(32),
            len: u64_at(40),
        }
    }
}

/// One RC connection with the local pool registered for remote writes.
pub struct Endpoint {
    qp: ExtendedQueuePair,
    cq: Arc<ExtendedCompletionQueue>,
    mr: Arc<MemoryRegion>,
    local: ConnInfo,
    remote: Option<ConnInfo>,
    port: u8,
    next_wr: u64,
}

impl Endpoint {
    /// Opens `device` (the first one when `None`), registers `region` once, creates the queue pair.
    pub fn open(
        device: Option<&str>,
        region: &Region,
        port: u8,
        gid_index: u32,
    ) -> Result<Endpoint> {
        let list = DeviceList::new().map_err(|e| err("listing verbs devices", format!("{e:?}")))?;
        let dev = list
            .iter()
            .find(|d| device.is_none_or(|n| d.name() == n))
            .ok_or_else(|| err("opening a device", format!("no verbs device named {device:?}")))?;
        let ctx = dev.open().map_err(|e| err("opening the device", format!("{e:?}")))?;
        let pd =
            ctx.alloc_pd().map_err(|e| err("allocating a protection domain", format!("{e:?}")))?;
        let base = if region.is_empty() { 0 } else { region_base(region) };
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite;
        // SAFETY: the region stays mapped for the engine's lifetime, which outlives this endpoint.
        let mr = unsafe { pd.reg_mr(base as usize, region.len(), access) }
            .map_err(|e| err("registering the pool", format!("{e:?}")))?;
        let cq = ctx
            .create_cq_builder()
            .setup_cqe(256)
            .build_ex()
            .map_err(|e| err("creating a CQ", format!("{e:?}")))?;
        let handle = GenericCompletionQueue::from(Arc::clone(&cq));
        let mut qp = pd
            .create_qp_builder()
            .setup_send_cq(handle.clone())
            .setup_recv_cq(handle)
            .setup_max_send_wr(128)
            .setup_max_recv_wr(16)
            .build_ex()
            .map_err(|e| err("creating a queue pair", format!("{e:?}")))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(port)
            .setup_access_flags(access);
        qp.modify(&attr).map_err(|e| err("queue pair to INIT", format!("{e:?}")))?;
        let gid = ctx
            .query_gid(port, gid_index)
            .map_err(|e| err("querying the GID", format!("{e:?}")))?;
        let local = ConnInfo {
            qp_number: qp.qp_number(),
            psn: rand::random::<u32>() & 0x00ff_ffff,
            gid: gid.raw,
            rkey: mr.rkey(),
            base,
            len: region.len() as u64,
        };
        Ok(Endpoint { qp, cq, mr, local, remote: None, port, next_wr: 1 })
    }

    /// What to send the peer.
    pub fn local_info(&self) -> ConnInfo {
        self.local
    }

    /// Moves the queue pair to RTS against the peer's queue pair.
    pub fn connect(&mut self, remote: ConnInfo) -> Result<()> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(Mtu::Mtu4096)
            .setup_dest_qp_num(remote.qp_number)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(1)
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(1)
            .setup_port(self.port)
            .setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_hop_limit(1);
        attr.setup_address_vector(&ah);
        self.qp.modify(&attr).map_err(|e| err("queue pair to RTR", format!("{e:?}")))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.local.psn)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(1);
        self.qp.modify(&attr).map_err(|e| err("queue pair to RTS", format!("{e:?}")))?;
        self.remote = Some(remote);
        Ok(())
    }

    /// Writes `len` bytes at `local_off` of our pool into the peer's pool at `remote_off`, and waits for
    /// the completion until `deadline`. Both ranges are bounds-checked first.
    pub fn write(
        &mut self,
        local_off: u64,
        remote_off: u64,
        len: u32,
        deadline: Instant,
    ) -> Result<()> {
        let remote = self.remote.ok_or_else(|| err("writing", "queue pair is not connected"))?;
        let fits =
            |off: u64, total: u64| off.checked_add(u64::from(len)).is_some_and(|end| end <= total);
        if !fits(local_off, self.local.len) || !fits(remote_off, remote.len) {
            return Err(TransferError::OutOfBounds(format!(
                "RDMA write of {len} bytes from {local_off} (pool {}) to {remote_off} (peer pool {})",
                self.local.len, remote.len
            )));
        }
        let id = self.next_wr;
        self.next_wr += 1;
        let mut guard = self.qp.start_post_send();
        let wr = guard
            .construct_wr(id, WorkRequestFlags::Signaled)
            .setup_write(remote.rkey, remote.base + remote_off);
        // SAFETY: the local range is inside the registered pool (checked above) and stays mapped.
        unsafe { wr.setup_sge(self.mr.lkey(), self.local.base + local_off, len) };
        guard.post().map_err(|e| err("posting an RDMA write", format!("{e:?}")))?;
        loop {
            if let Ok(mut poller) = self.cq.start_poll() {
                for wc in poller.by_ref() {
                    if wc.wr_id() != id {
                        continue;
                    }
                    if wc.status() != WorkCompletionStatus::Success as u32 {
                        return Err(err(
                            "RDMA write completion",
                            format!("status {}", wc.status()),
                        ));
                    }
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(TransferError::DeadlineExceeded {
                    during: "waiting for an RDMA write completion",
                });
            }
            std::hint::spin_loop();
        }
    }
}

fn region_base(region: &Region) -> u64 {
    // SAFETY: a zero-length view only reads the mapping's address.
    unsafe { region.slice(0, 0) }.as_ptr() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_info_round_trips() {
        let c = ConnInfo {
            qp_number: 7,
            psn: 0xabcdef,
            gid: [3; 16],
            rkey: 99,
            base: 1 << 40,
            len: 1 << 30,
        };
        assert_eq!(ConnInfo::decode(&c.encode()), c);
    }

    #[test]
    #[ignore = "needs an RDMA verbs device; this machine's kernel has no RDMA subsystem (ibv_devices lists none)"]
    fn loopback_write_between_two_endpoints() {
        let (a, b) = (
            Region::create("x2v-rdma-a", 1 << 20).unwrap(),
            Region::create("x2v-rdma-b", 1 << 20).unwrap(),
        );
        // SAFETY: test-local regions; no other views exist.
        unsafe { a.slice_mut(0, 4096) }.fill(0x5a);
        let mut ea = Endpoint::open(None, &a, 1, 0).unwrap();
        let mut eb = Endpoint::open(None, &b, 1, 0).unwrap();
        let (ia, ib) = (ea.local_info(), eb.local_info());
        ea.connect(ib).unwrap();
        eb.connect(ia).unwrap();
        ea.write(0, 8192, 4096, Instant::now() + std::time::Duration::from_secs(10)).unwrap();
        // SAFETY: the write completed; nothing else touches `b`.
        assert!(unsafe { b.slice(8192, 4096) }.iter().all(|&x| x == 0x5a));
        assert!(
            ea.write(0, (1 << 20) - 10, 4096, Instant::now()).is_err(),
            "out-of-bounds write refused"
        );
    }

    #[test]
    fn discovery_reports_a_clear_error_without_devices() {
        match devices() {
            Ok(list) => println!("verbs devices: {list:?}"),
            Err(e) => assert!(e.to_string().contains("rdma"), "{e}"),
        }
    }
}
