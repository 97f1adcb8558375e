//! Index selection shared by `weight-selection` and `prune`: which source rows/columns each
//! student dimension keeps, including attention heads (whole heads where possible).

use crate::error::{MasaError, Result};

/// Xu et al. (ICLR 2024) uniform element selection along one dimension, as their reference
/// code does it: when `d_t` divides `d_s`, every `(d_s/d_t)`-th index `0, s, 2s, …`; otherwise
/// `round(linspace(0, d_s − 1, d_t))` (round half to even, like `torch.round`). Indices are
/// always in `0..d_s`; `d_t = d_s` is the identity. `what` names the dimension in errors.
pub fn uniform_indices(d_s: usize, d_t: usize, what: &str) -> Result<Vec<usize>> {
    if d_t > d_s || d_t == 0 {
        return Err(MasaError::Invalid(format!(
            "cannot select {d_t} of the source's {d_s} {what}: selection and pruning need every student dimension \
             to be positive and at most the source's; choose a smaller student"
        )));
    }
    if d_s % d_t == 0 {
        let step = d_s / d_t;
        return Ok((0..d_t).map(|i| i * step).collect());
    }
    // d_t ≥ 2 here (d_t = 1 always divides).
    Ok((0..d_t).map(|i| ((i as f64) * (d_s - 1) as f64 / (d_t - 1) as f64).round_ties_even() as usize).collect())
}

/// The `k` indices with the highest `scores` (ties to the lower index), in original order.
pub fn top_k_in_order(scores: &[f64], k: usize, what: &str) -> Result<Vec<usize>> {
    if k > scores.len() || k == 0 {
        return Err(MasaError::Invalid(format!(
            "cannot keep {k} of the source's {} {what}: the student must be positive and no wider than the source",
            scores.len()
        )));
    }
    Ok(super::scale::select_rows(scores, k))
}

/// Shapes of an attention block: heads, KV heads, head dim.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub n: usize,
    pub kv: usize,
    pub dim: usize,
}

/// Rows of q_proj (and columns of o_proj) and rows of k_proj/v_proj the student keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnRows {
    pub q: Vec<usize>,
    pub kv: Vec<usize>,
}

/// Dimensions kept inside a head when the student's head dim is smaller. HF RoPE rotates
/// coordinate `i` with `i + d/2`, so pairs are kept together: uniform selection over the first
/// half, the same offsets in the second half.
pub fn head_dims(d_s: usize, d_t: usize) -> Result<Vec<usize>> {
    if d_s == d_t {
        return Ok((0..d_s).collect());
    }
    let half = uniform_indices(d_s / 2, d_t / 2, "RoPE pairs of a head")?;
    Ok(half.iter().copied().chain(half.iter().map(|i| i + d_s / 2)).collect())
}

/// Whole-head selection. `q_heads` (one source query head per student head, in order) is chosen
/// by the caller (uniformly, or by importance). Student KV head `g` serves query heads
/// `g·n_t/kv_t ..`; it takes the source KV head of the first of them, so every student query
/// head that comes from the first head of its group attends with exactly the keys and values
/// it had in the source (for an MHA student from a GQA source, all of them: KV heads are
/// duplicated). Within heads, [`head_dims`].
pub fn attention_rows(src: Heads, dst: Heads, q_heads: &[usize]) -> Result<AttnRows> {
    let dims = head_dims(src.dim, dst.dim)?;
    let src_group = src.n / src.kv;
    let dst_group = dst.n / dst.kv;
    let rows =
        |heads: &mut dyn Iterator<Item = usize>| -> Vec<usize> { heads.flat_map(|h| dims.iter().map(move |d| h * src.dim + d)).collect() };
    let q = rows(&mut q_heads.iter().copied());
    let kv = rows(&mut (0..dst.kv).map(|g| q_heads[g * dst_group] / src_group));
    Ok(AttnRows { q, kv })
}

/// Weight selection's attention: query heads uniformly selected (whole heads). When the
/// student has more heads than the source (narrower heads), whole heads are impossible and the
/// rows are selected uniformly along the flattened `heads × head_dim` dimension instead, for
/// q and for k/v separately (documented fallback; RoPE pairs are then not preserved).
pub fn uniform_attention_rows(src: Heads, dst: Heads) -> Result<AttnRows> {
    if dst.n <= src.n && dst.dim <= src.dim {
        let heads = uniform_indices(src.n, dst.n, "attention heads")?;
        return attention_rows(src, dst, &heads);
    }
    Ok(AttnRows {
        q: uniform_indices(src.n * src.dim, dst.n * dst.dim, "query rows (heads × head_dim)")?,
        kv: uniform_indices(src.kv * src.dim, dst.kv * dst.dim, "key/value rows (kv_heads × head_dim)")?,
    })
}

/// A dense f32 matrix, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn from_tensor(t: &candle_core::Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        Ok(Matrix { rows, cols, data: t.flatten_all()?.to_vec1::<f32>()? })
    }

    /// `self[rows, cols]`.
    pub fn select(&self, rows: &[usize], cols: &[usize]) -> Matrix {
        let mut data = Vec::with_capacity(rows.len() * cols.len());
        for &r in rows {
            let row = &self.data[r * self.cols..(r + 1) * self.cols];
            data.extend(cols.iter().map(|&c| row[c]));
        }
        Matrix { rows: rows.len(), cols: cols.len(), data }
    }

    pub fn row_sq_norm(&self, r: usize) -> f64 {
        self.data[r * self.cols..(r + 1) * self.cols].iter().map(|&v| (v as f64).powi(2)).sum()
    }

    pub fn col_sq_norm(&self, c: usize) -> f64 {
        (0..self.rows).map(|r| (self.data[r * self.cols + c] as f64).powi(2)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_indices_divisible_and_not() {
        assert_eq!(uniform_indices(12, 4, "x").unwrap(), vec![0, 3, 6, 9]);
        assert_eq!(uniform_indices(5, 5, "x").unwrap(), vec![0, 1, 2, 3, 4]);
        // 9 → 4: linspace(0, 8, 4) = 0, 2.667, 5.333, 8.
        assert_eq!(uniform_indices(9, 4, "x").unwrap(), vec![0, 3, 5, 8]);
        // 10 → 4: 0, 3, 6, 9.
        assert_eq!(uniform_indices(10, 4, "x").unwrap(), vec![0, 3, 6, 9]);
        // 7 → 5: 0, 1.5, 3, 4.5, 6 → half to even: 0, 2, 3, 4, 6.
        assert_eq!(uniform_indices(7, 5, "x").unwrap(), vec![0, 2, 3, 4, 6]);
        for (ds, dt) in [(576, 256), (1536, 768), (49152, 49151), (100, 99), (577, 3), (3, 2)] {
            let idx = uniform_indices(ds, dt, "x").unwrap();
            assert_eq!(idx.len(), dt);
            assert!(idx.iter().all(|&i| i < ds), "{ds}->{dt}");
            assert!(idx.windows(2).all(|w| w[0] < w[1]), "{ds}->{dt} not strictly increasing");
        }
        assert!(uniform_indices(4, 5, "hidden channels").unwrap_err().to_string().contains("hidden channels"));
    }

    #[test]
    fn attention_rows_keep_whole_heads_and_matching_kv() {
        // 9 heads / 3 KV (group 3), dim 4 → 4 heads / 4 KV (MHA), dim 2.
        let src = Heads { n: 9, kv: 3, dim: 4 };
        let dst = Heads { n: 4, kv: 4, dim: 2 };
        let a = uniform_attention_rows(src, dst).unwrap();
        // heads 0, 3, 5, 8; dims [0, 2] (one RoPE pair).
        assert_eq!(a.q, vec![0, 2, 12, 14, 20, 22, 32, 34]);
        // KV heads of q heads 0, 3, 5, 8: 0, 1, 1, 2.
        assert_eq!(a.kv, vec![0, 2, 4, 6, 4, 6, 8, 10]);
        // Same shape: identity.
        let same = uniform_attention_rows(src, src).unwrap();
        assert_eq!(same.q, (0..36).collect::<Vec<_>>());
        assert_eq!(same.kv, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn top_k_keeps_highest_in_order() {
        assert_eq!(top_k_in_order(&[1.0, 5.0, 3.0, 4.0], 2, "x").unwrap(), vec![1, 3]);
        assert!(top_k_in_order(&[1.0], 2, "FFN neurons").is_err());
    }
}
