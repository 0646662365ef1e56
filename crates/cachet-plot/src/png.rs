//! A dependency-free PNG encoder: stored deflate blocks inside zlib, so no compressor is needed.

/// Why pixels could not be encoded as a PNG.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PngError {
    /// The pixel buffer is not `width * height * 3` bytes long.
    #[error("a {width}x{height} RGB image needs {expected} bytes of pixels, got {actual}")]
    BufferSize {
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// Bytes the image needs (`width * height * 3`).
        expected: u128,
        /// Bytes given.
        actual: usize,
    },
}

/// Encodes 8-bit RGB pixels (`width * height * 3` bytes, rows top to bottom) as a PNG.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, PngError> {
    let expected = u128::from(width) * u128::from(height) * 3;
    if rgb.len() as u128 != expected {
        return Err(PngError::BufferSize {
            width,
            height,
            expected,
            actual: rgb.len(),
        });
    }
    Ok(write_png(width, height, rgb))
}

/// [`encode_png`] for a buffer already known to be `width * height * 3` bytes.
pub(crate) fn write_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let row = width as usize * 3;
    // Scanlines, each with filter type 0 (none).
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for line in rgb.chunks(row.max(1)).take(height as usize) {
        raw.push(0);
        raw.extend_from_slice(line);
    }

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    write_chunk(&mut png, b"IHDR", &ihdr);
    write_chunk(&mut png, b"IDAT", &zlib_stored(&raw));
    write_chunk(&mut png, b"IEND", &[]);
    png
}

fn write_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream of uncompressed ("stored") deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    const MAX_BLOCK: usize = 65_535;
    let blocks = data.len().div_ceil(MAX_BLOCK).max(1);
    let mut out = Vec::with_capacity(data.len() + blocks * 5 + 6);
    // CMF: deflate, 32 KiB window; FLG: no dictionary, check bits so CMF*256+FLG is a multiple of 31.
    out.extend_from_slice(&[0x78, 0x01]);
    let mut chunks = data.chunks(MAX_BLOCK).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(u8::from(last)); // BFINAL, BTYPE = 00 (stored)
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// zlib's Adler-32 checksum.
fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that can be summed before b could overflow.
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
};

/// The CRC-32 of PNG chunks (ISO 3309, as zlib's `crc32`).
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &byte in data {
        c = CRC_TABLE[((c ^ u32::from(byte)) & 0xff) as usize] ^ (c >> 8);
    }
    c ^ 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canvas::{BLACK, Canvas, WHITE};

    fn be32(bytes: &[u8]) -> u32 {
        u32::from_be_bytes(bytes[..4].try_into().unwrap())
    }

    /// Inflates a zlib stream made only of stored blocks, checking header and Adler-32.
    fn inflate_stored(zlib: &[u8]) -> Vec<u8> {
        let (cmf, flg) = (zlib[0], zlib[1]);
        assert_eq!(cmf & 0x0f, 8, "deflate");
        assert_eq!((u16::from(cmf) * 256 + u16::from(flg)) % 31, 0, "FCHECK");
        assert_eq!(flg & 0x20, 0, "no preset dictionary");
        let mut at = 2;
        let mut out = Vec::new();
        loop {
            let header = zlib[at];
            assert_eq!((header >> 1) & 3, 0, "stored block");
            let len = u16::from_le_bytes([zlib[at + 1], zlib[at + 2]]);
            let nlen = u16::from_le_bytes([zlib[at + 3], zlib[at + 4]]);
            assert_eq!(len, !nlen, "LEN/NLEN");
            at += 5;
            out.extend_from_slice(&zlib[at..at + len as usize]);
            at += len as usize;
            if header & 1 == 1 {
                break;
            }
        }
        assert_eq!(be32(&zlib[at..]), adler32(&out), "Adler-32");
        assert_eq!(at + 4, zlib.len(), "nothing after the checksum");
        out
    }

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
        assert_eq!(adler32(&[]), 1);
    }

    #[test]
    fn png_chunks_have_valid_crcs_and_inflate_to_the_pixels() {
        // Big enough for two stored blocks (> 65535 bytes of scanlines).
        let (w, h) = (200usize, 120usize);
        let mut canvas = Canvas::new(w, h, WHITE);
        canvas.fill_rect(10, 10, 50, 20, [200, 30, 40]);
        canvas.text(5, 60, "Abc 0.5 GiB", 2, BLACK);
        canvas.line(
            (0.0, 119.0),
            (199.0, 0.0),
            [0, 90, 200],
            2,
            Some((5.0, 3.0)),
            0.0,
        );
        let png = canvas.to_png();

        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut at = 8;
        let mut kinds = Vec::new();
        let mut idat = Vec::new();
        let mut ihdr = Vec::new();
        while at < png.len() {
            let len = be32(&png[at..]) as usize;
            let kind = &png[at + 4..at + 8];
            let data = &png[at + 8..at + 8 + len];
            let crc = be32(&png[at + 8 + len..]);
            assert_eq!(crc, crc32(&png[at + 4..at + 8 + len]), "CRC of {kind:?}");
            match kind {
                b"IHDR" => ihdr = data.to_vec(),
                b"IDAT" => idat.extend_from_slice(data),
                _ => {}
            }
            kinds.push(String::from_utf8(kind.to_vec()).unwrap());
            at += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        assert_eq!(be32(&ihdr[0..]), w as u32);
        assert_eq!(be32(&ihdr[4..]), h as u32);
        assert_eq!(&ihdr[8..], &[8, 2, 0, 0, 0]);

        let raw = inflate_stored(&idat);
        assert_eq!(raw.len(), h * (1 + 3 * w));
        for (y, line) in raw.chunks(1 + 3 * w).enumerate() {
            assert_eq!(line[0], 0, "filter type of row {y}");
            for x in 0..w {
                assert_eq!(&line[1 + 3 * x..4 + 3 * x], &canvas.get(x, y).unwrap());
            }
        }
        assert_eq!(canvas.get(20, 15), Some([200, 30, 40]));
        assert_eq!(canvas.get(w, 0), None);
        assert_eq!(canvas.get(0, h), None);
    }

    #[test]
    fn empty_image_still_has_a_final_block() {
        let png = encode_png(0, 0, &[]).unwrap();
        let idat_len = be32(&png[33..]) as usize;
        assert_eq!(inflate_stored(&png[41..41 + idat_len]).len(), 0);
    }

    #[test]
    fn a_buffer_of_the_wrong_size_is_an_error() {
        let err = encode_png(2, 2, &[0; 11]).unwrap_err();
        assert_eq!(
            err,
            PngError::BufferSize {
                width: 2,
                height: 2,
                expected: 12,
                actual: 11
            }
        );
        assert!(encode_png(u32::MAX, u32::MAX, &[]).is_err());
        assert_eq!(
            encode_png(2, 2, &[7; 12]).unwrap(),
            Canvas::new(2, 2, [7, 7, 7]).to_png()
        );
    }
}
