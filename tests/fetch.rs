//! Asset fetching without the network: assembling multi-part wheels, hash verification, and
//! the error when pip is missing.

use std::io::Write;
use std::path::Path;

use masa::fetch::{assemble, sha256_file, ModelAsset, PipPart};

fn write_wheel(path: &Path, member: &str, data: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file(member, opts).unwrap();
    z.write_all(data).unwrap();
    z.finish().unwrap();
}

const PARTS: &[PipPart] = &[
    PipPart { package: "fake-part1", version: "1.0", member: "fake_part1/data/m.part00" },
    PipPart { package: "fake-part2", version: "1.0", member: "fake_part2/data/m.part01" },
];

fn asset(sha: &'static str, size: u64) -> ModelAsset {
    ModelAsset { name: "fake", file_name: "m.gguf", size, sha256: sha, parts: PARTS, description: "test" }
}

fn make_parts(dir: &Path) -> (Vec<std::path::PathBuf>, Vec<u8>) {
    let a: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..33_333u32).map(|i| (i % 13) as u8).collect();
    let w1 = dir.join("fake_part1-1.0-py3-none-any.whl");
    let w2 = dir.join("fake_part2-1.0-py3-none-any.whl");
    write_wheel(&w1, PARTS[0].member, &a);
    write_wheel(&w2, PARTS[1].member, &b);
    let mut whole = a;
    whole.extend_from_slice(&b);
    (vec![w1, w2], whole)
}

#[test]
fn assembles_parts_in_order_and_verifies_hash() {
    let dir = tempfile::tempdir().unwrap();
    let (wheels, whole) = make_parts(dir.path());
    let expect_path = dir.path().join("expected.bin");
    std::fs::write(&expect_path, &whole).unwrap();
    let sha: &'static str = Box::leak(sha256_file(&expect_path).unwrap().into_boxed_str());
    let target = dir.path().join("out/m.gguf");
    assemble(&asset(sha, whole.len() as u64), &wheels, &target).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), whole);
}

#[test]
fn hash_mismatch_is_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (wheels, whole) = make_parts(dir.path());
    let target = dir.path().join("out/m.gguf");
    let bad = "0000000000000000000000000000000000000000000000000000000000000000";
    let err = assemble(&asset(bad, whole.len() as u64), &wheels, &target).unwrap_err().to_string();
    assert!(err.contains("sha256") && err.contains("m.gguf") && err.contains("masa fetch fake"), "{err}");
    assert!(!target.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out")).unwrap().collect();
    assert!(leftovers.is_empty(), "temp file left behind");
}

#[test]
fn wheel_without_the_member_names_the_wheel() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wheels, whole) = make_parts(dir.path());
    let other = dir.path().join("fake_part2-1.0-other.whl");
    write_wheel(&other, "something/else.bin", b"x");
    wheels[1] = other;
    let err = assemble(&asset("00", whole.len() as u64), &wheels, &dir.path().join("m.gguf")).unwrap_err().to_string();
    assert!(err.contains("fake_part2-1.0-other.whl") && err.contains("fake_part2/data/m.part01"), "{err}");
}

#[test]
fn missing_pip_is_explained() {
    let home = tempfile::tempdir().unwrap();
    let empty_path = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
        .args(["fetch", "smollm2-135m"])
        .env("MASA_HOME", home.path())
        .env("PATH", empty_path.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pip") && err.contains("install Python 3"), "{err}");
}

#[test]
fn unknown_asset_lists_known_ones() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masa")).args(["fetch", "llama-70b"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown asset `llama-70b`") && err.contains("smollm2-135m"), "{err}");
}
