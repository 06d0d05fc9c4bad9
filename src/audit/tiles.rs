//! C2SP tlog-tiles paths: `tile/<L>/<N>[.p/<W>]` and `tile/entries/<N>[.p/<W>]`, where `<N>` is
//! written in groups of three digits, all but the last prefixed with `x` (1234067 →
//! `x001/x234/067`). Pure: storage serves the tiles (`storage::Log::hash_tile`).

use super::Error;

/// An entry bundle: each entry (the first is entry `first`) as a big-endian u16 length and
/// its canonical bytes.
pub fn entry_bundle(first: u64, entries: &[Vec<u8>]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for (i, e) in (first..).zip(entries) {
        let len = u16::try_from(e.len())
            .map_err(|_| Error::Serialize(format!("entry {i} is longer than 65535 bytes")))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(e);
    }
    Ok(out)
}

/// What a tile path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileRef {
    /// A hash tile at tile level `level`.
    Hashes { level: u8, n: u64, width: u16 },
    /// An entry bundle.
    Entries { n: u64, width: u16 },
}

/// Parse the part of a tile URL after `tile/`. Only canonical paths are accepted.
pub fn parse(path: &str) -> Option<TileRef> {
    let (kind, rest) = path.split_once('/')?;
    let (index, width) = match rest.rsplit_once(".p/") {
        Some((index, w)) => {
            let w: u16 = w.parse().ok().filter(|w| (1..256).contains(w))?;
            (index, w)
        }
        None => (rest, 256),
    };
    let n = parse_index(index)?;
    let tile = match kind {
        "entries" => TileRef::Entries { n, width },
        level => {
            let level: u8 = level.parse().ok().filter(|l| *l < 64)?;
            if level.to_string() != kind {
                return None;
            }
            TileRef::Hashes { level, n, width }
        }
    };
    (path == render(tile)).then_some(tile)
}

/// The canonical path of a tile, after `tile/`.
pub fn render(tile: TileRef) -> String {
    let (head, n, width) = match tile {
        TileRef::Hashes { level, n, width } => (level.to_string(), n, width),
        TileRef::Entries { n, width } => ("entries".to_owned(), n, width),
    };
    let mut index = format!("{:03}", n % 1000);
    let mut rest = n / 1000;
    while rest > 0 {
        index = format!("x{:03}/{index}", rest % 1000);
        rest /= 1000;
    }
    let partial = if width == 256 {
        String::new()
    } else {
        format!(".p/{width}")
    };
    format!("{head}/{index}{partial}")
}

fn parse_index(s: &str) -> Option<u64> {
    let mut n: u64 = 0;
    let groups: Vec<&str> = s.split('/').collect();
    for (i, g) in groups.iter().enumerate() {
        let digits = if i + 1 < groups.len() {
            g.strip_prefix('x')?
        } else {
            g
        };
        if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n = n
            .checked_mul(1000)?
            .checked_add(digits.parse::<u64>().ok()?)?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_and_only_canonical_ones_parse() {
        let cases = [
            (
                "0/000",
                TileRef::Hashes {
                    level: 0,
                    n: 0,
                    width: 256,
                },
            ),
            (
                "0/x001/x234/067",
                TileRef::Hashes {
                    level: 0,
                    n: 1_234_067,
                    width: 256,
                },
            ),
            (
                "1/000.p/7",
                TileRef::Hashes {
                    level: 1,
                    n: 0,
                    width: 7,
                },
            ),
            (
                "entries/x001/000.p/255",
                TileRef::Entries {
                    n: 1000,
                    width: 255,
                },
            ),
        ];
        for (path, tile) in cases {
            assert_eq!(parse(path), Some(tile), "{path}");
            assert_eq!(render(tile), path);
        }
        for bad in [
            "0/0",
            "0/x000/001",
            "0/001.p/0",
            "0/001.p/256",
            "00/001",
            "64/000",
            "x/000",
            "0/000/",
            "entries/1000",
            "0/001.p/07",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
