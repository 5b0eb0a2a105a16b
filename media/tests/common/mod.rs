//! Test helpers: synthetic frames and the ffmpeg/ffprobe command-line tools.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// A smooth pattern that moves from frame to frame: diagonal gradients in R and G, a soft
/// horizontal wave in B, all shifted by a few pixels per frame.
pub fn moving_gradient(frames: usize, height: usize, width: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(frames * height * width * 3);
    for f in 0..frames {
        let shift = 3.0 * f as f64;
        for y in 0..height {
            for x in 0..width {
                let (xf, yf) = (x as f64 + shift, y as f64 + shift / 2.0);
                let r = 128.0 + 100.0 * (xf / width as f64 * std::f64::consts::PI).sin();
                let g = 40.0 + 180.0 * yf.rem_euclid(height as f64) / height as f64;
                let b = 128.0 + 90.0 * ((xf + yf) / 37.0).cos();
                data.extend([r, g, b].map(|v| v.round().clamp(0.0, 255.0) as u8));
            }
        }
    }
    data
}

/// Runs an ffmpeg tool, failing the test with a hint when it is not installed.
fn tool(name: &str) -> Command {
    let probe =
        Command::new(name).arg("-version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    match probe {
        Ok(status) if status.success() => Command::new(name),
        _ => panic!(
            "`{name}` not found on PATH: install ffmpeg (e.g. `apt-get install ffmpeg`; the x2v setup script does)"
        ),
    }
}

/// `ffprobe -count_frames -show_streams` of the file's first stream, as JSON.
pub fn probe_stream(path: &Path) -> serde_json::Value {
    let out = tool("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json"])
        .arg(path)
        .output()
        .expect("run ffprobe");
    assert!(out.status.success(), "ffprobe failed: {}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ffprobe JSON");
    let mut stream = json["streams"][0].clone();
    stream["format"] = json["format"].clone();
    stream
}

/// Decodes an MP4 with ffmpeg back to RGB24, `[frames, height, width, 3]`.
pub fn decode_rgb(mp4: &[u8]) -> Vec<u8> {
    let mut child = tool("ffmpeg")
        .args(["-v", "error", "-i", "pipe:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ffmpeg");
    let mut stdin = child.stdin.take().unwrap();
    let input = mp4.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("ffmpeg output");
    writer.join().unwrap().expect("feed ffmpeg");
    assert!(out.status.success(), "ffmpeg failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Peak signal-to-noise ratio in dB between two equal-length 8-bit buffers.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "PSNR needs equal lengths");
    let sse: f64 = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
    let mse = sse / a.len() as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}
