//! Key directory costs: publishing, lookup-proof size and verification, history and append-only
//! proofs, for directories of 10^4 and 10^6 accounts (akd in memory: proof sizes and client
//! costs do not depend on the storage), and publishing through Fumi's own storage (SQLite, the
//! path the server takes). Prints numbers; asserts nothing about speed.
//!
//! `cargo bench -p fumi-server --bench key_directory` (sizes as arguments, e.g. `-- 10000`;
//! `--sqlite N` for the SQLite run's size, default 10000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use akd::ecvrf::HardCodedAkdVRF;
use akd::storage::StorageManager;
use akd::storage::memory::AsyncInMemoryDatabase;
use akd::{AkdLabel, AkdValue, AzksParallelismConfig, Directory, HistoryParams};
use ed25519_dalek::SigningKey;
use fumi_audit::keys::{self, AccountEntry, Config, DeviceKey, EpochHead, account_label};
use fumi_proto::{AccountId, DeviceId};
use fumi_server::key_directory::KeyDirectory;
use fumi_server::storage::{SqliteStorage, Storage};

/// Accounts published per epoch while filling a directory.
const BATCH: usize = 100_000;
/// Lookups measured per directory.
const SAMPLES: usize = 300;

fn account(i: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&i.to_be_bytes());
    id[8..].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_be_bytes());
    id
}

/// A realistic entry: an identity key and two devices.
fn entry(i: u64, version: u8) -> AkdValue {
    let seed = account(i);
    AccountEntry {
        identity_key: [seed[0] ^ version; 32],
        devices: (0..2u8)
            .map(|d| DeviceKey {
                device: [d.wrapping_add(version); 16],
                signature_key: vec![seed[1] ^ d; 32],
            })
            .collect(),
    }
    .encode()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

async fn in_memory(size: u64) {
    let storage = StorageManager::new_no_cache(AsyncInMemoryDatabase::new());
    let directory = Directory::<Config, _, _>::new(storage, HardCodedAkdVRF, AzksParallelismConfig::default())
        .await
        .unwrap();
    let started = Instant::now();
    let mut next = 0u64;
    while next < size {
        let end = (next + BATCH as u64).min(size);
        let updates: Vec<(AkdLabel, AkdValue)> =
            (next..end).map(|i| (account_label(&account(i)), entry(i, 0))).collect();
        directory.publish(updates).await.unwrap();
        next = end;
    }
    let publish = started.elapsed();
    // Three accounts change twice more, for history proofs; the last step is audited.
    let mut previous_root = [0; 32];
    for version in 1..=2u8 {
        previous_root = directory.get_epoch_hash().await.unwrap().1;
        let updates = (0..3)
            .map(|i| (account_label(&account(i)), entry(i, version)))
            .collect();
        directory.publish(updates).await.unwrap();
    }
    let akd::EpochHash(epoch, root_hash) = directory.get_epoch_hash().await.unwrap();
    let vrf_public_key: [u8; 32] = directory.get_public_key().await.unwrap().to_bytes();
    let head = EpochHead {
        epoch,
        root_hash,
        vrf_public_key,
        published_at: 0,
    };

    let mut proof_sizes = Vec::new();
    let mut generate = Vec::new();
    let mut verify = Vec::new();
    for sample in 0..SAMPLES as u64 {
        let i = sample.wrapping_mul(2_654_435_761) % size;
        let label = account_label(&account(i));
        let started = Instant::now();
        let (proof, _) = directory.lookup(label.clone()).await.unwrap();
        generate.push(started.elapsed());
        let wire = keys::encode_lookup_proof(&proof);
        proof_sizes.push(wire.len() / 2);
        let started = Instant::now();
        let verified = keys::verify_lookup(&head, &label, &wire).unwrap();
        verify.push(started.elapsed());
        assert_eq!(AkdValue(verified.value).0.len(), entry(i, 0).0.len());
    }
    generate.sort();
    verify.sort();
    proof_sizes.sort();

    let label = account_label(&account(0));
    let (history, _) = directory.key_history(&label, HistoryParams::Complete).await.unwrap();
    let history_wire = keys::encode_history_proof(&history);
    let started = Instant::now();
    let versions = keys::verify_history(&head, &label, &history_wire).unwrap();
    let history_verify = started.elapsed();
    assert_eq!(versions.len(), 3);

    let audit = directory.audit(epoch - 1, epoch).await.unwrap();
    let audit_wire = keys::encode_append_only_proof(&audit);
    let heads = [
        EpochHead {
            epoch: epoch - 1,
            root_hash: previous_root,
            vrf_public_key,
            published_at: 0,
        },
        head.clone(),
    ];
    let started = Instant::now();
    keys::verify_append_only(&heads, &audit_wire).await.unwrap();
    let audit_verify = started.elapsed();

    println!(
        "directory of {size} accounts ({epoch} epochs): publish {:.1} s ({:.0} accounts/s), RSS {} MiB",
        publish.as_secs_f64(),
        size as f64 / publish.as_secs_f64(),
        rss_mib()
    );
    println!(
        "  lookup proof: {} bytes median ({}–{}), server generates in {:?} median / {:?} p99, client verifies in {:?} median / {:?} p99",
        proof_sizes[proof_sizes.len() / 2],
        proof_sizes[0],
        proof_sizes[proof_sizes.len() - 1],
        percentile(&generate, 0.5),
        percentile(&generate, 0.99),
        percentile(&verify, 0.5),
        percentile(&verify, 0.99),
    );
    println!(
        "  history proof (3 versions): {} bytes, verified in {:?}",
        history_wire.len() / 2,
        history_verify
    );
    println!(
        "  append-only proof for an epoch of 3 changes: {} bytes, verified in {audit_verify:?}",
        audit_wire.len() / 2
    );
}

async fn through_sqlite(size: u64) {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(SqliteStorage::open(&dir.path().join("fumi.db")).await.unwrap());
    let key = SigningKey::from_bytes(&[7; 32]);
    let directory = KeyDirectory::open(storage.clone(), &key).await.unwrap();
    let started = Instant::now();
    for i in 0..size {
        let device = DeviceId::from_bytes(account(i + size));
        storage
            .create_account(AccountId::from_bytes(account(i)), &[1; 32], device, &[2; 32], None, 0)
            .await
            .unwrap();
        storage.set_signature_key(device, &[3; 32]).await.unwrap();
    }
    let registered = started.elapsed();
    let started = Instant::now();
    let mut epochs = 0;
    while directory.publish_pending(60_000).await.unwrap().is_some() {
        epochs += 1;
    }
    let publish = started.elapsed();
    let mut lookups = Vec::new();
    for sample in 0..SAMPLES as u64 {
        let i = sample.wrapping_mul(2_654_435_761) % size;
        let started = Instant::now();
        directory
            .lookup(account_label(&account(i)), "an account", 60_000)
            .await
            .unwrap();
        lookups.push(started.elapsed());
    }
    lookups.sort();
    let bytes = std::fs::metadata(dir.path().join("fumi.db"))
        .map(|m| m.len())
        .unwrap_or(0)
        + std::fs::metadata(dir.path().join("fumi.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    println!(
        "through Fumi's SQLite storage, {size} accounts: registered in {:.1} s; published in {:.1} s over {epochs} epoch(s) ({:.0} accounts/s); lookup with proof {:?} median / {:?} p99; database {} MiB",
        registered.as_secs_f64(),
        publish.as_secs_f64(),
        size as f64 / publish.as_secs_f64(),
        percentile(&lookups, 0.5),
        percentile(&lookups, 0.99),
        bytes >> 20
    );
}

#[tokio::main]
async fn main() {
    let mut sizes = Vec::new();
    let mut sqlite = 10_000u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bench" => {}
            "--sqlite" => sqlite = args.next().and_then(|v| v.parse().ok()).expect("--sqlite N"),
            other => sizes.push(other.parse::<u64>().expect("sizes are numbers")),
        }
    }
    if sizes.is_empty() {
        sizes = vec![10_000, 1_000_000];
    }
    for size in sizes {
        in_memory(size).await;
    }
    if sqlite > 0 {
        through_sqlite(sqlite).await;
    }
}
