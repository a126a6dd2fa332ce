//! MLS costs on one core: encrypting and decrypting an application message, and one commit
//! (adding a device) in groups of 10, 100 and 1,000 devices: creating it at the committer and
//! processing it at another member. Prints numbers; asserts nothing about speed.
//!
//! `cargo bench -p fumi-core --bench mls` (add group sizes as arguments, e.g. `-- 10 1000`).

use std::time::{Duration, Instant};

use fumi_core::AccountIdentity;
use fumi_core::mls::{Incoming, MlsDevice};
use fumi_proto::{AccountId, DeviceId, GroupId};
use openmls_rust_crypto::OpenMlsRustCrypto;

type Device = MlsDevice<OpenMlsRustCrypto>;

fn device(n: u32) -> Device {
    let provider = OpenMlsRustCrypto::default();
    let key = MlsDevice::generate_signature_key(&provider).unwrap();
    let identity = AccountIdentity::generate(&mut rand::rng());
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    MlsDevice::open(
        provider,
        &identity,
        AccountId::from_bytes(id),
        DeviceId::from_bytes(id),
        &key,
    )
    .unwrap()
}

fn key_package(of: &Device, verifier: &Device) -> openmls::prelude::KeyPackage {
    let bytes = of.key_packages(1, false).unwrap().one_time.remove(0);
    let me = of.me();
    verifier.verify_key_package(&bytes, me.account, me.device).unwrap().0
}

/// A group of `size` devices made by `owner`, with `member` (device 1) a joined member that
/// follows every commit.
fn group_of(size: usize) -> (Device, Device, GroupId) {
    let owner = device(0);
    let member = device(1);
    let group = GroupId::from_bytes([7; 16]);
    owner.create_group(group).unwrap();
    let commit = owner.add_members(group, &[key_package(&member, &owner)]).unwrap();
    owner.confirm_commit(group).unwrap();
    member.handle_message(commit.welcome.as_ref().unwrap()).unwrap();
    let others: Vec<Device> = (2..size as u32).map(device).collect();
    for batch in others.chunks(100) {
        let key_packages: Vec<_> = batch.iter().map(|d| key_package(d, &owner)).collect();
        let commit = owner.add_members(group, &key_packages).unwrap();
        owner.confirm_commit(group).unwrap();
        member.handle_message(&commit.message).unwrap();
    }
    (owner, member, group)
}

fn per_op(total: Duration, count: usize) -> f64 {
    total.as_secs_f64() * 1e6 / count as f64
}

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![10, 100, 1000] } else { sizes };

    let (owner, member, group) = group_of(2);
    let plaintext = vec![7u8; 300];
    let count = 5_000;
    let started = Instant::now();
    let messages: Vec<Vec<u8>> = (0..count)
        .map(|_| owner.encrypt(group, &plaintext).unwrap().message)
        .collect();
    let encrypt = started.elapsed();
    let started = Instant::now();
    for message in &messages {
        assert!(matches!(
            member.handle_message(message).unwrap(),
            Incoming::Application { .. }
        ));
    }
    let decrypt = started.elapsed();
    println!(
        "application message (300 bytes, {} bytes on the wire): encrypt {:.1} µs, decrypt {:.1} µs",
        messages[0].len(),
        per_op(encrypt, count),
        per_op(decrypt, count)
    );

    for size in sizes
        .into_iter()
        .filter(|s| (6..=fumi_core::mls::MAX_GROUP_MEMBERS).contains(s))
    {
        let started = Instant::now();
        // Built `rounds` short, so that the measured commits bring it to `size`.
        let rounds = 3;
        let (owner, member, group) = group_of(size - rounds);
        let setup = started.elapsed();
        let (mut create, mut process, mut bytes) = (Duration::ZERO, Duration::ZERO, 0);
        for round in 0..rounds {
            let newcomer = device(1_000_000 + round as u32);
            let key_package = key_package(&newcomer, &owner);
            let started = Instant::now();
            let commit = owner.add_members(group, &[key_package]).unwrap();
            owner.confirm_commit(group).unwrap();
            create += started.elapsed();
            bytes = commit.message.len();
            let started = Instant::now();
            member.handle_message(&commit.message).unwrap();
            process += started.elapsed();
        }
        println!(
            "group of {size} devices (built in {:.1} s): add-one commit {} bytes, create {:.2} ms, process {:.2} ms (mean of {rounds})",
            setup.as_secs_f64(),
            bytes,
            create.as_secs_f64() * 1e3 / rounds as f64,
            process.as_secs_f64() * 1e3 / rounds as f64
        );
    }
}
