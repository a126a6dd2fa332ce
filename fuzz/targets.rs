//! Fuzz target bodies, shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/`) and the replay of
//! the checked-in corpus and every crash ever found, which runs in `cargo test`
//! (`crates/fumi-cli/tests/fuzz_corpus.rs`). Each body feeds arbitrary bytes to decoders that
//! take input from the other side; a panic is a finding. The includer provides `framing` (the
//! server's MLS framing module) in its crate root.

use fumi_core::attachment::{self, AttachmentKey, Sealed};
use fumi_core::mls::MlsDevice;
use fumi_core::{AccountIdentity, Content, DeviceCredential, Profile, ProfileKey, Username};
use fumi_proto::*;

/// A target body.
pub type Target = fn(&[u8]);

/// Every target, by name (the corpus directory names).
pub const TARGETS: &[(&str, Target)] = &[
    ("server_request", server_request),
    ("mls_framing", mls_framing),
    ("client_response", client_response),
    ("content", content),
    ("mls_incoming", mls_incoming),
    ("accountability", accountability),
    ("official", official),
    ("key_directory", key_directory),
];

fn json<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
    let _ = serde_json::from_slice::<T>(bytes);
}

/// Every JSON body and WebSocket frame the server parses; the first byte picks the type.
pub fn server_request(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 16 {
        0 => json::<RegisterRequest>(body),
        1 => json::<UsernameClaim>(body),
        2 => json::<SealedProfile>(body),
        3 => json::<KeyPackageUpload>(body),
        4 => json::<KeyPackageClaim>(body),
        5 => json::<SubmitMessage>(body),
        6 => json::<SealedAvatar>(body),
        7 => json::<LinkCreate>(body),
        8 => json::<LinkOpen>(body),
        9 => json::<LinkDevice>(body),
        10 => json::<LinkHistory>(body),
        11 => json::<InviteCreate>(body),
        12 => json::<InviteRedeem>(body),
        13 => json::<BlobCreate>(body),
        14 => json::<ClientFrame>(body),
        _ => {
            // Path ids as the server parses them.
            if let Ok(text) = std::str::from_utf8(body) {
                let _ = AccountId::parse(text);
                let _ = DeviceId::parse(text);
                let _ = BlobId::parse(text);
            }
        }
    }
}

/// The only MLS parsing on the server.
pub fn mls_framing(data: &[u8]) {
    let _ = crate::framing::inspect_group_message(data);
    let _ = crate::framing::check_welcome(data);
    let _ = crate::framing::key_package_signature_key(data);
}

/// Everything the client decodes from server answers and frames, and its own stored records
/// (attachment pointers and download queue entries, file views in history, outbox requests).
pub fn client_response(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 15 {
        0 => json::<ServerFrame>(body),
        1 => json::<RegisterResponse>(body),
        2 => json::<UsernameLookup>(body),
        3 => json::<AccountInfo>(body),
        4 => json::<KeyPackageCount>(body),
        5 => json::<ClaimedKeyPackages>(body),
        6 => json::<SubmitAccepted>(body),
        7 => json::<LinkBundle>(body),
        8 => json::<LinkStatus>(body),
        9 => json::<BlobCreated>(body),
        10 => json::<BlobUploadStatus>(body),
        11 => json::<ErrorBody>(body),
        12 => json::<fumi_core::Attachment>(body),
        13 => json::<fumi_client::FileView>(body),
        _ => json::<SubmitMessage>(body),
    }
}

/// Plaintext formats a client opens: message content, padding, device credentials, sealed
/// profiles, avatars and boxes, attachment blobs, usernames.
pub fn content(data: &[u8]) {
    let _ = Content::decode(data);
    let _ = fumi_core::padding::unpad(data);
    let _ = DeviceCredential::decode(data);
    let key = ProfileKey::from_bytes([7; 32]);
    let account = AccountId::from_bytes([1; 16]);
    let _ = Profile::open(data, &key, account);
    let _ = fumi_core::profile::open_avatar(data, &key, account);
    let _ = fumi_core::sealing::open(&[7; 32], b"label", data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Username::parse(text);
    }
    // A blob of any length against sizes taken from the input itself.
    let plaintext_size = data.first().map_or(0, |b| u64::from(*b) * 997);
    let expected = Sealed {
        digest: [0; 32],
        plaintext_size,
        ciphertext_size: attachment::ciphertext_size(plaintext_size),
    };
    let _ = attachment::decrypt(
        &AttachmentKey::from_bytes([7; 32]),
        &mut &data[..],
        &expected,
        &mut std::io::sink(),
    );
}

thread_local! {
    static DEVICE: MlsDevice<openmls_rust_crypto::OpenMlsRustCrypto> = {
        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let key = MlsDevice::generate_signature_key(&provider).expect("key");
        let identity = AccountIdentity::from_secret(&[3; 32]);
        MlsDevice::open(provider, &identity, AccountId::from_bytes([1; 16]), DeviceId::from_bytes([2; 16]), &key)
            .expect("device")
    };
}

/// What a client does with an envelope from the server: MLS processing, in a device that is in
/// no group (so every message is foreign, a Welcome not for it, or garbage).
pub fn mls_incoming(data: &[u8]) {
    DEVICE.with(|device| {
        let _ = device.handle_message(data);
    });
}

/// What a moderator and an auditor parse from others: sealed abuse reports and their franking
/// evidence (written by a possibly malicious reporter), and the transparency log's answers
/// (served by a possibly malicious operator). The first byte picks the decoder.
pub fn accountability(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 6 {
        0 => {
            let _ = fumi_core::franking::Report::open(&openmls_rust_crypto::RustCrypto::default(), body, &[7; 32]);
        }
        1 => {
            if let Ok(report) = serde_json::from_slice::<fumi_core::franking::Report>(body) {
                let _ = report.evidence.verify();
            }
        }
        2 => {
            if let Ok(head) = serde_json::from_slice::<fumi_audit::SignedTreeHead>(body) {
                let _ = head.verify();
            }
        }
        3 => {
            if let Ok(page) = serde_json::from_slice::<fumi_audit::EntriesPage>(body) {
                for entry in &page.entries {
                    let _ = fumi_audit::Entry::from_bytes(entry.as_bytes());
                }
            }
        }
        4 => {
            if let Ok(proof) = serde_json::from_slice::<fumi_audit::InclusionProof>(body)
                && let Some(path) = fumi_audit::decode_path(&proof.path)
            {
                let leaf = fumi_audit::merkle::leaf_hash(b"entry");
                let _ = fumi_audit::merkle::verify_inclusion(proof.index, proof.tree_size, &leaf, &path, &[0; 32]);
            }
        }
        _ => {
            if let Ok(proof) = serde_json::from_slice::<fumi_audit::ConsistencyProof>(body)
                && let Some(path) = fumi_audit::decode_path(&proof.path)
            {
                let _ = fumi_audit::merkle::verify_consistency(proof.first, proof.second, &[1; 32], &[2; 32], &path);
            }
        }
    }
}

/// Official accounts: what subscribers open (channel links, sealed descriptions and posts from a
/// possibly malicious server, verification statements), what staff check (form definitions and
/// answers from the public), and the channel bodies the server parses. The first byte picks.
pub fn official(data: &[u8]) {
    use fumi_core::form::{Answers, FormDefinition};
    use fumi_core::official::*;
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let owner_key = AccountIdentity::from_secret(&[3; 32]).public_key();
    let channel = ChannelId::from_bytes([4; 16]);
    let key = |epoch: u32| (epoch == 0).then_some([7u8; 32]);
    match selector % 12 {
        0 => {
            let _ = ChannelLink::from_bytes(body);
        }
        1 => {
            let seq = body.first().map_or(0, |b| u64::from(*b));
            let _ = open_post(key, &owner_key, channel, seq, body);
        }
        2 => {
            let _ = open_info(key, &owner_key, channel, body);
        }
        3 => {
            let _ = FormDefinition::parse(body);
        }
        4 => {
            let form = FormDefinition::parse(
                br#"{"title":"t","fields":[{"name":"a","label":"A","type":"text","required":true,"max_length":5},
                    {"name":"b","label":"B","type":"choices","choices":["x","y"]},{"name":"c","label":"C","type":"date"},
                    {"name":"d","label":"D","type":"number"},{"name":"e","label":"E","type":"boolean"}]}"#,
            )
            .expect("a valid form");
            if let Ok(answers) = serde_json::from_slice::<Answers>(body) {
                let _ = form.check_answers(&answers);
            }
            if let Ok(text) = std::str::from_utf8(body) {
                for field in &form.fields {
                    let _ = field.parse_typed(text);
                }
            }
        }
        5 => {
            if let Ok(profile) = serde_json::from_slice::<OrganisationProfile>(body) {
                let trusted = [TrustedAuthority {
                    name: "a".into(),
                    public_key: owner_key,
                }];
                let _ = profile.verification(AccountId::from_bytes([1; 16]), &owner_key, &trusted, 1);
            }
        }
        6 => json::<ChannelCreate>(body),
        7 => json::<ChannelPostSubmit>(body),
        8 => json::<ChannelState>(body),
        9 => json::<ChannelPosts>(body),
        10 => json::<Post>(body),
        _ => json::<ChannelInfo>(body),
    }
}

/// What a client parses from the key directory: account and username entries, signed epoch
/// heads, and lookup, history and append-only proofs (protobuf) checked against a head.
pub fn key_directory(data: &[u8]) {
    use fumi_audit::keys::{self, AccountEntry, EpochHead, SignedEpochHead, UsernameEntry};
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    // Proof inputs: root hash (32) ‖ VRF public key (32) ‖ the protobuf proof, so that seeds made
    // by a real directory (`cargo run -p fumi-server --example key_directory_fuzz_seeds`) reach
    // the deep checks.
    let (root_hash, vrf_public_key, proof) = if body.len() < 64 {
        ([0; 32], [0; 32], body)
    } else {
        (
            body[..32].try_into().expect("32 bytes"),
            body[32..64].try_into().expect("32 bytes"),
            &body[64..],
        )
    };
    let hex: String = proof.iter().map(|b| format!("{b:02x}")).collect();
    let head = EpochHead {
        epoch: 3,
        root_hash,
        vrf_public_key,
        published_at: 0,
    };
    let label = keys::account_label(&[1; 16]);
    match selector % 6 {
        0 => {
            if let Ok(entry) = AccountEntry::decode(body) {
                assert_eq!(
                    AccountEntry::decode(&entry.encode().0),
                    Ok(entry),
                    "one encoding per entry"
                );
            }
        }
        1 => {
            let _ = UsernameEntry::decode(body);
        }
        2 => {
            if let Ok(head) = serde_json::from_slice::<SignedEpochHead>(body) {
                let _ = head.named_log_key();
                let _ = head.verify(&[0; 32]);
            }
        }
        3 => {
            let _ = keys::verify_lookup(&head, &label, &hex);
        }
        4 => {
            let _ = keys::verify_history(&head, &label, &hex);
        }
        _ => {
            let next = EpochHead {
                epoch: 4,
                ..head.clone()
            };
            // The check awaits nothing; one poll runs it to the end.
            let heads = [head, next];
            let check = keys::verify_append_only(&heads, &hex);
            let mut check = std::pin::pin!(check);
            let _ = check
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        }
    }
}
