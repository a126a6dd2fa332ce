//! Writes seed inputs for the `key_directory` fuzz target: real lookup, history and append-only
//! proofs from a small directory (with the root and VRF key they verify under), and entries.
//!
//! `cargo run -p fumi-server --example key_directory_fuzz_seeds -- fuzz/corpus/key_directory`

use akd::ecvrf::HardCodedAkdVRF;
use akd::storage::StorageManager;
use akd::storage::memory::AsyncInMemoryDatabase;
use akd::{AzksParallelismConfig, Directory, HistoryParams};
use fumi_audit::keys::{self, AccountEntry, Config, DeviceKey, UsernameEntry, account_label};

fn entry(version: u8) -> AccountEntry {
    AccountEntry {
        identity_key: [version; 32],
        devices: vec![DeviceKey {
            device: [version; 16],
            signature_key: vec![version; 32],
        }],
    }
}

#[tokio::main]
async fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("output directory"));
    std::fs::create_dir_all(&out).unwrap();
    let write = |name: &str, selector: u8, bytes: &[u8]| {
        std::fs::write(out.join(name), [&[selector][..], bytes].concat()).unwrap();
    };
    let directory = Directory::<Config, _, _>::new(
        StorageManager::new_no_cache(AsyncInMemoryDatabase::new()),
        HardCodedAkdVRF,
        AzksParallelismConfig::disabled(),
    )
    .await
    .unwrap();
    let label = account_label(&[1; 16]);
    // Epochs 1 to 3 (the fuzz target checks against epoch 3); the account changes in each.
    let mut roots = vec![directory.get_epoch_hash().await.unwrap().1];
    for version in 1..=3u8 {
        let updates = vec![
            (label.clone(), entry(version).encode()),
            (account_label(&[version + 1; 16]), entry(0).encode()),
        ];
        roots.push(directory.publish(updates).await.unwrap().1);
    }
    let vrf: [u8; 32] = directory.get_public_key().await.unwrap().to_bytes();
    let prefix = |root: &[u8; 32]| [root.as_slice(), &vrf].concat();
    let (lookup, _) = directory.lookup(label.clone()).await.unwrap();
    let lookup = hex::decode(keys::encode_lookup_proof(&lookup)).unwrap();
    write("seed-lookup", 3, &[prefix(&roots[3]), lookup].concat());
    let (history, _) = directory.key_history(&label, HistoryParams::Complete).await.unwrap();
    let history = hex::decode(keys::encode_history_proof(&history)).unwrap();
    write("seed-history", 4, &[prefix(&roots[3]), history].concat());
    // The append-only step the target checks is epoch 3 → 4 against one root: a step proof from
    // 2 to 3 under root 2 gives the verifier real nodes to hash.
    let audit = directory.audit(2, 3).await.unwrap();
    let audit = hex::decode(keys::encode_append_only_proof(&audit)).unwrap();
    write("seed-audit", 5, &[prefix(&roots[2]), audit].concat());
    write("seed-account", 0, &entry(1).encode().0);
    write("seed-username", 1, &UsernameEntry { account: Some([1; 16]) }.encode().0);
    let head = keys::EpochHead {
        epoch: 3,
        root_hash: roots[3],
        vrf_public_key: vrf,
        published_at: 1,
    }
    .sign(&ed25519_dalek::SigningKey::from_bytes(&[9; 32]));
    write("seed-head", 2, serde_json::to_string(&head).unwrap().as_bytes());
    println!("wrote 6 seeds to {}", out.display());
}
