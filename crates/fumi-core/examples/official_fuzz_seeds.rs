//! Writes seed inputs for the `official` fuzz target that open under the target's fixed keys
//! (channel key `[7; 32]`, organisation identity secret `[3; 32]`, channel `[4; 16]`), so the
//! fuzzer starts past the AEAD and the signature:
//! `cargo run -p fumi-core --example official_fuzz_seeds -- fuzz/corpus/official`.

use fumi_core::AccountIdentity;
use fumi_core::form::FormDefinition;
use fumi_core::official::*;
use fumi_proto::ChannelId;

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: official_fuzz_seeds DIR"));
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    let identity = AccountIdentity::from_secret(&[3; 32]);
    let key = ChannelKey { epoch: 0, key: [7; 32] };
    let channel = ChannelId::from_bytes([4; 16]);
    let mut rng = rand::rng();
    let form = FormDefinition::parse(
        br#"{"title":"Check-in","fields":[{"name":"t","label":"Temperature","type":"number","required":true},
            {"name":"s","label":"Site","type":"choice","choices":["North","South"]}]}"#,
    )
    .expect("a valid form");
    // The target serves a post under the number in its first byte (the epoch's high byte, 0).
    let bodies = [
        (
            0,
            PostBody::Text {
                text: "clinic opens at 9".into(),
            },
        ),
        (
            0,
            PostBody::Form {
                form_id: "ab".repeat(16),
                form,
            },
        ),
        (
            1,
            PostBody::Text {
                text: "replayed".into(),
            },
        ),
    ];
    let mut seeds = Vec::new();
    for (seq, body) in bodies {
        let post = Post {
            v: CHANNEL_VERSION,
            channel,
            epoch: 0,
            seq,
            sent_at: 1,
            body,
        };
        seeds.push([&[1u8][..], &seal_post(&identity, &key, &post, &mut rng)].concat());
    }
    let info = ChannelInfo {
        v: CHANNEL_VERSION,
        channel,
        epoch: 0,
        name: "Notices".into(),
        description: Some("d".into()),
        organisation: OrganisationProfile {
            name: "City".into(),
            logo: None,
            verification: None,
        },
    };
    seeds.push([&[2u8][..], &seal_info(&identity, &key, &info, &mut rng)].concat());
    for (i, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("sealed-{i}")), seed).expect("write a seed");
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
}
