//! The error and endpoint tables of `docs/PROTOCOL.md` are generated from the typed descriptors
//! in `fumi-proto`, so the document cannot drift from the code. After changing a descriptor, run
//! `FUMI_UPDATE_DOCS=1 cargo test -p fumi-proto --test protocol_tables` to rewrite them.

use std::path::PathBuf;

fn protocol_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/PROTOCOL.md")
}

/// The text between `<!-- generated: NAME -->` and `<!-- end generated -->`, with its place.
fn generated_block(document: &str, name: &str) -> (usize, usize) {
    let start_marker = format!("<!-- generated: {name} (do not edit; see fumi-proto/tests/protocol_tables.rs) -->\n");
    let start = document
        .find(&start_marker)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no marker {start_marker:?}"))
        + start_marker.len();
    let end = document[start..]
        .find("<!-- end generated -->")
        .unwrap_or_else(|| panic!("the generated {name} block is not closed"))
        + start;
    (start, end)
}

fn check(name: &str, generated: &str) {
    let path = protocol_path();
    let document = std::fs::read_to_string(&path).expect("docs/PROTOCOL.md is readable");
    let (start, end) = generated_block(&document, name);
    if document[start..end] == *generated {
        return;
    }
    if std::env::var_os("FUMI_UPDATE_DOCS").is_some() {
        let updated = format!("{}{generated}{}", &document[..start], &document[end..]);
        std::fs::write(&path, updated).expect("docs/PROTOCOL.md is writable");
        return;
    }
    panic!(
        "the {name} in docs/PROTOCOL.md differs from fumi-proto's descriptors; run \
         FUMI_UPDATE_DOCS=1 cargo test -p fumi-proto --test protocol_tables\n\nexpected:\n{generated}"
    );
}

// One test, so that an update rewrites the file once at a time.
#[test]
fn the_error_and_endpoint_tables_are_the_descriptors() {
    check("error table", &fumi_proto::error_table());
    check("endpoint table", &fumi_proto::endpoints::endpoint_table());
}
