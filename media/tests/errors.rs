//! Bad input through the public API: the right `MediaError`, with a message naming the value.

use x2v_media::{
    Frames, ImageFormat, MediaError, Mp4Options, SpriteOptions, encode_image, encode_mp4,
    spritesheet_jpeg, thumbnail_webp,
};

fn message_has(err: &MediaError, parts: &[&str]) {
    let msg = err.to_string();
    for part in parts {
        assert!(msg.contains(part), "{msg:?} should mention {part:?}");
    }
}

#[test]
fn wrong_data_length() {
    let err = Frames::new(&[0; 100], 2, 4, 4).unwrap_err();
    assert!(matches!(err, MediaError::DataLength { actual: 100, expected: 96, .. }), "{err:?}");
    message_has(&err, &["100", "96", "frames=2 height=4 width=4"]);
    assert!(err.is_invalid_input());
}

#[test]
fn zero_frames() {
    let err = Frames::new(&[], 0, 16, 16).unwrap_err();
    assert!(matches!(err, MediaError::ZeroSize { frames: 0, .. }), "{err:?}");
    message_has(&err, &["frames=0"]);
}

#[test]
fn odd_width() {
    let data = vec![0; 16 * 17 * 3];
    let err = encode_mp4(&Frames::new(&data, 1, 16, 17).unwrap(), 16, &Mp4Options::default())
        .unwrap_err();
    assert!(matches!(err, MediaError::OddSize { width: 17, height: 16 }), "{err:?}");
    message_has(&err, &["even", "width=17"]);
}

#[test]
fn fps_zero() {
    let data = vec![0; 16 * 16 * 3];
    let err =
        encode_mp4(&Frames::new(&data, 1, 16, 16).unwrap(), 0, &Mp4Options::default()).unwrap_err();
    assert!(matches!(err, MediaError::Fps { fps: 0, .. }), "{err:?}");
    message_has(&err, &["fps", "got 0"]);
    assert!(err.is_invalid_input());
}

#[test]
fn unknown_image_format() {
    let err = "tiff".parse::<ImageFormat>().unwrap_err();
    assert!(matches!(err, MediaError::UnknownImageFormat(ref s) if s == "tiff"), "{err:?}");
    message_has(&err, &["tiff", "png"]);
}

#[test]
fn bad_image_and_preview_options() {
    let data = vec![0; 16 * 16 * 3];
    let frames = Frames::new(&data, 1, 16, 16).unwrap();
    message_has(&thumbnail_webp(&frames, 0).unwrap_err(), &["max_side", "got 0"]);
    let opts = SpriteOptions { max_columns: 0, ..SpriteOptions::default() };
    message_has(&spritesheet_jpeg(&frames, &opts).unwrap_err(), &["max_columns", "got 0"]);
    let err = encode_image(&data, 16, 16, ImageFormat::Jpeg, Some(150)).unwrap_err();
    message_has(&err, &["output_compression", "got 150"]);
    let err = encode_image(&data, 16, 0, ImageFormat::Png, None).unwrap_err();
    assert!(matches!(err, MediaError::ZeroSize { .. }), "{err:?}");
}
