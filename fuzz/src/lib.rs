//! The fuzz targets' shared bodies; see `../targets.rs`.

#[path = "../../crates/fumi-server/src/framing.rs"]
#[allow(dead_code)]
pub mod framing;

#[path = "../targets.rs"]
pub mod targets;
