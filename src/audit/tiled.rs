//! The Merkle tree as C2SP tlog-tiles: immutable full tiles of 256 hashes (tile level `t` holds
//! tree level `8t`) kept in a store, plus the right edge in memory — the last, incomplete tile
//! of each level, at most 255 hashes per level. Memory is O(log n) plus whatever tile cache the
//! caller keeps, and opening a log reads O(log n) tiles, whatever its size.
//!
//! Pure: the caller fetches tiles. Every RFC 6962 computation runs twice over [`TileNodes`]:
//! once to learn which full tiles it needs ([`TileNodes::collecting`]), once with them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::merkle::{Hash, Nodes, node_hash};

/// Hashes per full tile.
pub const WIDTH: usize = 256;
/// Tree levels per tile level.
pub const HEIGHT: u32 = 8;

/// A full tile: (tile level, tile index) and its 256 hashes.
pub type TileId = (u32, u64);
pub type Tile = Arc<Vec<Hash>>;

/// The right edge of a tree: its size and, per tile level, the hashes of its incomplete tile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edge {
    size: u64,
    partial: Vec<Vec<Hash>>,
    /// The roots of the perfect subtrees the tree is made of, largest first (one per bit set
    /// in `size`): the root of the whole tree is O(log n) hashes away.
    peaks: Vec<Hash>,
}

/// Why an edge could not be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tile level {level} of a tree of {size} leaves needs {want} hashes, got {got}")]
pub struct EdgeError {
    pub size: u64,
    pub level: u32,
    pub want: usize,
    pub got: usize,
}

impl Edge {
    pub fn new() -> Self {
        Self::default()
    }

    /// The edge of a tree of `size` leaves from its incomplete tiles (`partial[t]`: the hashes
    /// at tree level 8t after the last full tile of level t).
    pub fn from_partials(size: u64, partial: Vec<Vec<Hash>>) -> Result<Self, EdgeError> {
        for level in 0..levels(size).max(partial.len() as u32) {
            let want = ((hashes_at(size, level)) % WIDTH as u64) as usize;
            let got = partial.get(level as usize).map_or(0, Vec::len);
            if got != want {
                return Err(EdgeError {
                    size,
                    level,
                    want,
                    got,
                });
            }
        }
        let mut edge = Self {
            size,
            partial,
            peaks: Vec::new(),
        };
        let none = HashMap::new();
        let mut nodes = TileNodes::new(&edge, &none);
        let mut peaks = Vec::new();
        let mut start = 0u64;
        for height in (0..64u32).rev() {
            if size & (1u64 << height) != 0 {
                // Every complete subtree of the decomposition lies on the edge.
                let peak = nodes.node(height, start >> height).map_err(|_| EdgeError {
                    size,
                    level: height / HEIGHT,
                    want: 0,
                    got: 0,
                })?;
                peaks.push(peak);
                start += 1u64 << height;
            }
        }
        edge.peaks = peaks;
        Ok(edge)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The incomplete tile of level `t`: its index and hashes (possibly none).
    pub fn partial(&self, level: u32) -> (u64, &[Hash]) {
        let index = hashes_at(self.size, level) / WIDTH as u64;
        let hashes = self
            .partial
            .get(level as usize)
            .map_or(&[][..], Vec::as_slice);
        (index, hashes)
    }

    /// Append a leaf; returns the tiles it completed, lowest level first.
    pub fn push(&mut self, leaf: Hash) -> Vec<(TileId, Tile)> {
        // Merge the new leaf with the peaks it completes; the subtree roots passed at heights
        // 8, 16, … are the roots of the tiles this leaf completes.
        let mut peak = leaf;
        let mut height = 0u32;
        let mut tile_roots = Vec::new();
        while self.size & (1u64 << height) != 0 {
            // A peak exists for every bit set in `size`.
            let left = self.peaks.pop().unwrap_or_default();
            peak = node_hash(&left, &peak);
            height += 1;
            if height.is_multiple_of(HEIGHT) {
                tile_roots.push(peak);
            }
        }
        self.peaks.push(peak);
        self.size += 1;
        let mut completed = Vec::new();
        let mut hash = leaf;
        let mut level = 0u32;
        loop {
            if self.partial.len() <= level as usize {
                self.partial.push(Vec::new());
            }
            let row = &mut self.partial[level as usize];
            row.push(hash);
            if row.len() < WIDTH {
                break;
            }
            let full = std::mem::take(row);
            hash = match tile_roots.get(level as usize) {
                Some(root) => *root,
                None => tile_root(&full),
            };
            let index = hashes_at(self.size, level) / WIDTH as u64 - 1;
            completed.push(((level, index), Arc::new(full)));
            level += 1;
        }
        completed
    }

    /// The root of the whole tree, from its peaks.
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        let Some(mut root) = peaks.next().copied() else {
            return super::merkle::empty_root();
        };
        for left in peaks {
            root = node_hash(left, &root);
        }
        root
    }

    /// The bytes of the O(log n) state this edge holds (for the metrics and the tests).
    pub fn hashes_held(&self) -> usize {
        self.partial.iter().map(Vec::len).sum()
    }
}

/// How many hashes exist at tree level 8·`level` in a tree of `size` leaves.
pub fn hashes_at(size: u64, level: u32) -> u64 {
    size.checked_shr(HEIGHT * level).unwrap_or(0)
}

/// How many hashes tile `n` of tile level `level` holds in a tree of `size` leaves (0 if
/// it does not exist).
pub fn available(size: u64, level: u32, n: u64) -> u64 {
    hashes_at(size, level)
        .saturating_sub(n.saturating_mul(WIDTH as u64))
        .min(WIDTH as u64)
}

/// Tile levels a tree of `size` leaves has hashes on.
pub fn levels(size: u64) -> u32 {
    (0..8).take_while(|l| hashes_at(size, *l) > 0).count() as u32
}

/// The hash of a complete subtree given its 2^k hashes at its bottom level.
pub fn reduce(hashes: &[Hash]) -> Hash {
    debug_assert!(hashes.len().is_power_of_two());
    let mut row: Vec<Hash> = hashes.to_vec();
    while row.len() > 1 {
        row = row.chunks(2).map(|p| node_hash(&p[0], &p[1])).collect();
    }
    row[0]
}

/// The hash one tile level up: the root of a full tile.
pub fn tile_root(hashes: &[Hash]) -> Hash {
    reduce(hashes)
}

/// A tile is missing from what was fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing(pub TileId);

/// Complete-subtree hashes from an edge and fetched full tiles. In collecting mode a missing
/// tile is recorded (and a placeholder returned) instead of failing.
pub struct TileNodes<'a> {
    edge: &'a Edge,
    tiles: &'a HashMap<TileId, Tile>,
    collect: Option<BTreeSet<TileId>>,
}

impl<'a> TileNodes<'a> {
    pub fn new(edge: &'a Edge, tiles: &'a HashMap<TileId, Tile>) -> Self {
        Self {
            edge,
            tiles,
            collect: None,
        }
    }

    pub fn collecting(edge: &'a Edge, tiles: &'a HashMap<TileId, Tile>) -> Self {
        Self {
            edge,
            tiles,
            collect: Some(BTreeSet::new()),
        }
    }

    /// The full tiles a collecting pass found missing.
    pub fn missing(self) -> BTreeSet<TileId> {
        self.collect.unwrap_or_default()
    }

    /// `count` hashes at tree level 8·`level` from position `first` (all within one tile).
    fn row(&mut self, level: u32, first: u64, count: usize) -> Result<Option<&[Hash]>, Missing> {
        let tile = first / WIDTH as u64;
        let offset = (first % WIDTH as u64) as usize;
        let (edge_tile, partial) = self.edge.partial(level);
        let hashes: &[Hash] = if tile == edge_tile {
            partial
        } else if let Some(t) = self.tiles.get(&(level, tile)) {
            t.as_slice()
        } else if let Some(c) = self.collect.as_mut() {
            c.insert((level, tile));
            return Ok(None);
        } else {
            return Err(Missing((level, tile)));
        };
        Ok(hashes.get(offset..offset + count))
    }
}

impl Nodes for TileNodes<'_> {
    type Error = Missing;

    fn node(&mut self, level: u32, index: u64) -> Result<Hash, Missing> {
        let (tile_level, rest) = (level / HEIGHT, level % HEIGHT);
        let count = 1usize << rest;
        let first = index << rest;
        match self.row(tile_level, first, count)? {
            Some(hashes) => Ok(reduce(hashes)),
            // Collecting, or asked for a subtree the tree does not have (callers check sizes).
            None => Ok([0u8; 32]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::{self, Tree, leaf_hash};

    /// A store that holds every full tile an edge completed.
    fn build(n: u64) -> (Tree, Edge, HashMap<TileId, Tile>) {
        let mut tree = Tree::new();
        let mut edge = Edge::new();
        let mut tiles = HashMap::new();
        for i in 0..n {
            let l = leaf_hash(&i.to_be_bytes());
            tree.push(l);
            tiles.extend(edge.push(l));
        }
        (tree, edge, tiles)
    }

    #[test]
    fn tiles_give_the_same_roots_and_proofs_as_the_whole_tree() {
        for n in [
            1u64, 2, 3, 255, 256, 257, 511, 512, 513, 1000, 65535, 65536, 65537, 70001,
        ] {
            let (tree, edge, tiles) = build(n);
            assert_eq!(edge.size(), n);
            for size in [1, n / 3 + 1, n / 2 + 1, n - 1, n]
                .into_iter()
                .filter(|s| *s >= 1)
            {
                let mut nodes = TileNodes::new(&edge, &tiles);
                assert_eq!(
                    merkle::root(&mut nodes, size).unwrap(),
                    tree.root(size).unwrap(),
                    "root n={n} size={size}"
                );
                assert_eq!(edge.root(), tree.root(n).unwrap());
                for index in [0, size / 2, size - 1] {
                    let mut nodes = TileNodes::new(&edge, &tiles);
                    let got = merkle::inclusion_proof(&mut nodes, index, size)
                        .unwrap()
                        .unwrap();
                    assert_eq!(got, tree.inclusion_proof(index, size).unwrap());
                }
                let from = (size / 2).max(1);
                let mut nodes = TileNodes::new(&edge, &tiles);
                let got = merkle::consistency_proof(&mut nodes, from, size)
                    .unwrap()
                    .unwrap();
                assert_eq!(got, tree.consistency_proof(from, size).unwrap());
            }
        }
    }

    #[test]
    fn the_edge_is_small_and_rebuilds_from_its_partial_tiles() {
        let (_, edge, tiles) = build(70001);
        // 70001 = 1·65536 + 17·256 + 113: at most 255 hashes per level, 3 levels.
        assert_eq!(edge.hashes_held(), 113 + 17 + 1);
        assert_eq!(tiles.len(), 273 + 1);
        let rebuilt =
            Edge::from_partials(70001, (0..3).map(|l| edge.partial(l).1.to_vec()).collect())
                .unwrap();
        assert_eq!(rebuilt, edge);
        assert!(Edge::from_partials(70001, vec![vec![[0u8; 32]; 112]]).is_err());
    }

    #[test]
    fn a_collecting_pass_names_exactly_the_tiles_needed() {
        let (tree, edge, all) = build(5000);
        let empty = HashMap::new();
        let mut collect = TileNodes::collecting(&edge, &empty);
        let _ = merkle::inclusion_proof(&mut collect, 7, 4000).unwrap();
        let needed = collect.missing();
        assert!(!needed.is_empty() && needed.len() <= 4, "{needed:?}");
        let fetched: HashMap<TileId, Tile> = needed
            .iter()
            .map(|id| (*id, Arc::clone(&all[id])))
            .collect();
        let mut nodes = TileNodes::new(&edge, &fetched);
        assert_eq!(
            merkle::inclusion_proof(&mut nodes, 7, 4000)
                .unwrap()
                .unwrap(),
            tree.inclusion_proof(7, 4000).unwrap()
        );
    }
}
