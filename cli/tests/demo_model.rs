//! `x2v demo-model --family qwen-image` end to end: the real binary writes the Qwen-Image demo
//! model, and `x2v generate` makes a text-to-image PNG from `t2i/` and an edit of two input PNGs
//! from `edit/`, each of the asked size.

use std::path::Path;
use std::process::{Command, Output};

fn x2v(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_x2v")).args(args).output().expect("x2v runs")
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(o.status.success(), "x2v failed: {}", String::from_utf8_lossy(&o.stderr));
}

/// The PNG at `path` as RGB, of `width` × `height` and not one flat colour.
#[track_caller]
fn assert_png(path: &Path, width: u32, height: u32) {
    let img = image::open(path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (width, height), "{}", path.display());
    let first = img.get_pixel(0, 0);
    assert!(img.pixels().any(|p| p != first), "{} is one flat colour", path.display());
}

/// A small RGB gradient PNG.
fn write_png(path: &Path, width: u32, height: u32) {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, ((x + y) % 256) as u8])
    });
    img.save(path).unwrap();
}

#[test]
fn qwen_image_demo_model_generates_and_edits() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let demo_arg = demo.to_str().unwrap();
    let o = x2v(&["demo-model", "--family", "qwen-image", "--out", demo_arg]);
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Qwen-Image demo models"));

    let t2i = tmp.path().join("t2i.png");
    let t2i_dir = demo.join("t2i");
    assert_ok(&x2v(&[
        "generate",
        "--model-dir",
        t2i_dir.to_str().unwrap(),
        "--task",
        "t2i",
        "--prompt",
        "a red fox in the snow",
        "--size",
        "256x256",
        "--steps",
        "2",
        "--out",
        t2i.to_str().unwrap(),
    ]));
    assert_png(&t2i, 256, 256);

    let (a, b) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
    write_png(&a, 96, 64);
    write_png(&b, 48, 80);
    let edit = tmp.path().join("edit.png");
    let edit_dir = demo.join("edit");
    assert_ok(&x2v(&[
        "generate",
        "--model-dir",
        edit_dir.to_str().unwrap(),
        "--task",
        "edit",
        "--prompt",
        "picture 1 in the style of picture 2",
        "--image",
        a.to_str().unwrap(),
        "--image",
        b.to_str().unwrap(),
        "--size",
        "320x192",
        "--steps",
        "2",
        "--out",
        edit.to_str().unwrap(),
    ]));
    assert_png(&edit, 320, 192);
}

#[test]
fn i2v_is_only_for_wan() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = x2v(&["demo-model", "--family", "qwen-image", "--i2v", "--out", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--i2v is for --family wan"), "{err}");
    assert!(!out.exists(), "nothing is written");
    let o = x2v(&[
        "demo-model",
        "--family",
        "qwen-image",
        "--two-experts",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--two-experts is for --family wan"), "{err}");
    assert!(!out.exists(), "nothing is written");
    let o = x2v(&["demo-model", "--family", "flux", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("qwen-image"));
}
