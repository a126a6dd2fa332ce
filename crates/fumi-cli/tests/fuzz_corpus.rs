//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) and every crash ever found
//! (`fuzz/artifacts/<target>/`) through the fuzz target bodies on stable, so a decoder that
//! regresses on a known input fails `cargo test`. New inputs come from `scripts/fuzz.sh`.

mod framing {
    pub use fumi_server::framing::*;
}

#[path = "../../../fuzz/targets.rs"]
mod targets;

use std::path::Path;

#[test]
fn corpus_and_past_crashes_decode_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut replayed = 0;
    for (name, target) in targets::TARGETS {
        let mut inputs = 0;
        for kind in ["corpus", "artifacts"] {
            let dir = root.join(kind).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(outcome.is_ok(), "{name} panics on {}", path.display());
                inputs += 1;
            }
        }
        assert!(
            inputs > 0,
            "no corpus for {name}: run scripts/fuzz.sh and check in fuzz/corpus/{name}"
        );
        replayed += inputs;
    }
    eprintln!("replayed {replayed} inputs");
}
