//! KVMerger (Wang, Jin, Yu, Zhang, "Model Tells You Where to Merge: Adaptive KV Cache
//! Merging for LLMs on Long-Context Tasks", arXiv 2407.08454, 2024).
//!
//! 1. Protect the most recent tokens and the tokens with the highest attention
//!    (accumulated, or SnapKV's last-window attention with `protect_by = window`).
//! 2. Group the rest into runs of consecutive tokens whose keys are similar: in `merge`
//!    mode by merging adjacent runs most-similar-first until the head holds exactly its
//!    budget; in `exact` and `threshold` modes by the paper's threshold scan (see
//!    [`merging_sets`]).
//! 3. Fold each run into one entry: keys and values averaged with Gaussian-kernel weights
//!    centred on the pivot, the member with the highest accumulated attention; the entry
//!    takes the pivot's position and remembers how many tokens it stands for.
//! 4. Budget (the paper leaves this open; see `docs/methods.md`): `merge` needs nothing
//!    more; `exact` evicts the unprotected entries with the lowest attention until the
//!    budget is met; `threshold` keeps whatever merging leaves.
//!
//! Merging happens after the prompt (and, in an incremental prefill, whenever a chunk
//! would not fit beside the budget); decoded tokens are appended unmerged unless a bound on
//! the cache while decoding (`max_kv`) is reached, when the head is merged again.

use std::ops::Range;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize};

use crate::budget::Budget;
use crate::cache::{EntryMeta, HeadCache};
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport};
use crate::methods::keydiff::keydiff_scores;
use crate::methods::merging_sets::{
    mean_row, merge_to_target, merging_sets, min_reachable, CompareTo, Linkage, RunScoring,
};
use crate::methods::select::top_k;
use crate::stats::{StatsRequest, Windows};

/// How the result is brought to the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMode {
    /// Merge adjacent unprotected runs most-similar-first until the head holds exactly its
    /// budget; nothing is evicted.
    #[default]
    Merge,
    /// Threshold merging, then evict the lowest-attention unprotected entries down to the
    /// budget (ablation).
    Exact,
    /// Threshold merging, no eviction: the achieved ratio is whatever the threshold gives.
    Threshold,
}

impl BudgetMode {
    /// The mode's name, as in a configuration.
    pub fn name(self) -> &'static str {
        match self {
            BudgetMode::Merge => "merge",
            BudgetMode::Exact => "exact",
            BudgetMode::Threshold => "threshold",
        }
    }
}

/// Who reads the threshold scan's parameters.
const SCAN_MODES: &str = "budget_mode = exact or threshold (with merge = true)";
/// Who reads the merge parameters.
const MERGING: &str = "merge = true";

/// How key similarity is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Similarity {
    /// Cosine of the keys (paper).
    #[default]
    Cosine,
    /// Cosine after subtracting the head's mean key over the prompt: ignores the direction
    /// every key of a head shares.
    Centered,
}

/// What must agree for two adjacent runs to merge in `merge` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AgreeOn {
    /// Their keys (paper): runs are as similar as their key centroids.
    #[default]
    Keys,
    /// Their keys and their values: runs are as similar as the smaller of the two centroid
    /// cosines, so that a merged value stands for every member's value too.
    KeysAndValues,
}

/// Which attention statistic chooses the protected high-attention tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProtectBy {
    /// Attention accumulated over the whole prompt (paper).
    #[default]
    Accumulated,
    /// Attention from the prompt's last `protect_window` queries (SnapKV's statistic).
    Window,
    /// No attention: the keys that point furthest from the head's mean key direction
    /// (KeyDiff's score), the distinctive tokens that merging would blur.
    KeyDiff,
}

/// What the protected shares (`recent`, `selected`) are shares of, and which budget ratio
/// picks their defaults. The two agree on a head that nothing has merged yet (a prompt
/// compressed once); they differ when an incremental prefill compresses a head again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SharesOf {
    /// The entries the compression sees (budget plus a chunk, during an incremental
    /// prefill: a ratio at which the defaults are those of a 50%+ budget).
    Entries,
    /// The prompt tokens those entries stand for (the sum of their counts): the protected
    /// tokens a compression keeps are those of a prompt compressed once at that length.
    /// The default (ours): chosen on development seeds, where it kept incremental prefill
    /// within the interval of compressing once (docs/methods.md).
    #[default]
    Tokens,
}

/// How the attention of an entry ranks it for protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProtectScore {
    /// The attention the entry received (a merged entry: the sum of its members').
    #[default]
    Total,
    /// That attention over the tokens the entry stands for, so that a merged entry does not
    /// win protection by the number of its members.
    PerToken,
}

/// Kernel width of the Gaussian merge weights. JSON: `{"fixed": 5.0}`, `5.0` or `"adaptive"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sigma {
    /// A fixed sigma (the paper's grid search: 5 on Llama2-7B).
    Fixed(f32),
    /// Mean distance from the members to the pivot, floored by `sigma_floor`.
    Adaptive,
}

impl<'de> Deserialize<'de> for Sigma {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(f32),
            Tagged(Tagged),
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Tagged {
            Fixed(f32),
            Adaptive,
        }
        let repr = Repr::deserialize(d).map_err(|_| {
            serde::de::Error::custom(r#"expected a number, {"fixed": 5.0} or "adaptive""#)
        })?;
        Ok(match repr {
            Repr::Number(s) | Repr::Tagged(Tagged::Fixed(s)) => Sigma::Fixed(s),
            Repr::Tagged(Tagged::Adaptive) => Sigma::Adaptive,
        })
    }
}

/// How a merged entry accounts for the number of tokens it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MassRule {
    /// No correction: a merged entry draws the attention of one token.
    None,
    /// Scale the merged value by the number of tokens merged (one reading of the paper).
    ScaleValues,
    /// Add `ln(count)` to the merged entry's attention logit: exact for identical keys.
    /// The default: chosen on development seeds, where merging to the budget with
    /// `scale_values` multiplied long runs' values and broke the model (docs/methods.md).
    #[default]
    LogCount,
}

/// Merge weights inside a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MergeWeights {
    /// Gaussian kernel around the pivot (paper).
    #[default]
    Gaussian,
    /// Plain average (ablation).
    Uniform,
}

/// Which member of a set is the pivot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PivotRule {
    /// The member with the largest accumulated attention (paper).
    #[default]
    Attention,
    /// A seeded random member (ablation).
    Random,
}

/// KVMerger parameters; defaults follow the paper and `docs/methods.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvMergerConfig {
    pub budget: Budget,
    pub budget_mode: BudgetMode,
    /// Cosine-similarity threshold `eps` of the `exact` and `threshold` modes (paper: 0.75).
    /// Above 1 nothing merges; below -1 every run of unprotected tokens merges.
    pub threshold: f32,
    pub compare_to: CompareTo,
    pub similarity: Similarity,
    /// What must agree for runs to merge in `merge` mode. Written out only when set, so
    /// configurations (and the sweep rows fingerprinted by them) stay as they were.
    #[serde(skip_serializing_if = "is_default")]
    pub agree_on: AgreeOn,
    /// How adjacent runs are compared in `merge` mode (written out only when set).
    #[serde(skip_serializing_if = "is_default")]
    pub linkage: Linkage,
    pub protect_by: ProtectBy,
    /// Observation window of `protect_by = window` (SnapKV's default, 32).
    pub protect_window: usize,
    /// Share of the prompt kept as an unmerged recent window; default by budget
    /// (0.17 at budgets of 50% and more, 0.08 below).
    pub recent: Option<f64>,
    /// Share of the prompt kept unmerged for its high attention; default by budget
    /// (0.12 at budgets of 50% and more, 0.02 below).
    pub selected: Option<f64>,
    pub sigma: Sigma,
    /// Lower bound of the adaptive sigma.
    pub sigma_floor: f32,
    pub mass: MassRule,
    pub weights: MergeWeights,
    pub pivot: PivotRule,
    /// `false` disables merging (ablation: protected tokens plus eviction).
    pub merge: bool,
    /// Seed of the random-pivot ablation.
    pub seed: u64,
    /// What the protected shares are taken of (matters only for a head compressed again).
    #[serde(skip_serializing_if = "is_default")]
    pub shares_of: SharesOf,
    /// How attention ranks entries for protection (matters only once entries are merged).
    #[serde(skip_serializing_if = "is_default")]
    pub protect_score: ProtectScore,
    /// Whether an entry weighs as the tokens it stands for when a run's similarity is
    /// scored and when the run is folded (matters only once entries are merged).
    #[serde(skip_serializing_if = "is_default")]
    pub count_weighted: bool,
    /// Per-layer budget ratios (from `kvmerger analyze --suggest-budget`), one per layer of
    /// the model; they replace `budget` layer by layer, and `budget` is their average.
    pub layer_budgets: Option<Vec<f64>>,
    /// The model `layer_budgets` were measured on (its file and layer count), as `analyze`
    /// writes it: named when they meet a model with another layer count. Written out only
    /// when set, so configurations (and the sweep rows fingerprinted by them) stay as they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_budgets_model: Option<String>,
}

impl Default for KvMergerConfig {
    fn default() -> Self {
        Self {
            budget: Budget::default(),
            budget_mode: BudgetMode::default(),
            threshold: 0.75,
            compare_to: CompareTo::default(),
            similarity: Similarity::default(),
            agree_on: AgreeOn::default(),
            linkage: Linkage::default(),
            protect_by: ProtectBy::default(),
            protect_window: 32,
            recent: None,
            selected: None,
            sigma: Sigma::Fixed(5.0),
            sigma_floor: 1e-3,
            mass: MassRule::default(),
            weights: MergeWeights::default(),
            pivot: PivotRule::default(),
            merge: true,
            seed: 0,
            shares_of: SharesOf::default(),
            protect_score: ProtectScore::default(),
            count_weighted: false,
            layer_budgets: None,
            layer_budgets_model: None,
        }
    }
}

impl KvMergerConfig {
    /// Every parameter with its value, including those the serialised form leaves out at
    /// their defaults (so that older fingerprints stay): what `kvmerger methods` lists.
    pub fn all_parameters(&self) -> serde_json::Map<String, serde_json::Value> {
        let to_value = |v: serde_json::Result<serde_json::Value>| v.expect("parameters serialise");
        let serde_json::Value::Object(mut listed) = to_value(serde_json::to_value(self)) else {
            unreachable!("a configuration serialises to a JSON object")
        };
        let unwritten = [
            ("agree_on", to_value(serde_json::to_value(self.agree_on))),
            ("linkage", to_value(serde_json::to_value(self.linkage))),
            ("shares_of", to_value(serde_json::to_value(self.shares_of))),
            ("protect_score", to_value(serde_json::to_value(self.protect_score))),
            ("count_weighted", self.count_weighted.into()),
            ("layer_budgets_model", to_value(serde_json::to_value(&self.layer_budgets_model))),
        ];
        for (name, value) in unwritten {
            listed.entry(name).or_insert(value);
        }
        listed
    }

    pub fn validate(&self) -> Result<()> {
        if let Sigma::Fixed(s) = self.sigma {
            if !(s > 0.0 && s.is_finite()) {
                return Err(CompressError::invalid(
                    "sigma",
                    format!("must be positive and finite, got {s}"),
                ));
            }
        }
        if !(self.sigma_floor > 0.0 && self.sigma_floor.is_finite()) {
            return Err(CompressError::invalid(
                "sigma_floor",
                format!("must be positive and finite, got {}", self.sigma_floor),
            ));
        }
        if self.threshold.is_nan() {
            return Err(CompressError::invalid("threshold", "must be a number"));
        }
        if self.protect_window == 0 {
            return Err(CompressError::invalid("protect_window", "must be at least 1"));
        }
        for (name, share) in [("recent", self.recent), ("selected", self.selected)] {
            if let Some(s) = share {
                if !(0.0..=1.0).contains(&s) {
                    return Err(CompressError::invalid(
                        name,
                        format!("must be a share in [0, 1], got {s}"),
                    ));
                }
            }
        }
        if self.recent.unwrap_or(0.0) + self.selected.unwrap_or(0.0) > 1.0 {
            return Err(CompressError::invalid("recent", "recent + selected must not exceed 1"));
        }
        if let Some(b) = &self.layer_budgets {
            if let Some(bad) = b.iter().find(|r| !(**r > 0.0 && **r <= 1.0)) {
                return Err(CompressError::invalid(
                    "layer_budgets",
                    format!("ratios must be in (0, 1], got {bad}"),
                ));
            }
            self.check_layer_budgets_average(b)?;
        }
        self.check_parameters_act()
    }

    /// The label shows `budget`, so per-layer budgets must average it.
    fn check_layer_budgets_average(&self, layer_budgets: &[f64]) -> Result<()> {
        let average = layer_budgets.iter().sum::<f64>() / layer_budgets.len().max(1) as f64;
        let matches = match self.budget {
            Budget::Ratio(r) => (average - r).abs() < 5e-4,
            Budget::Tokens(_) => false,
        };
        if matches {
            return Ok(());
        }
        Err(CompressError::invalid(
            "layer_budgets",
            format!(
                "they average {} but the budget is {}: set `budget` to their average, or give \
                 --budget, which rescales them",
                Budget::Ratio(average),
                self.budget
            ),
        ))
    }

    /// Refuses a parameter set away from its default where the chosen mode never reads it
    /// (`threshold` in `merge` mode): it would change nothing, yet show in the label.
    fn check_parameters_act(&self) -> Result<()> {
        let d = Self::default();
        let merges = self.merge;
        let scans = merges && self.budget_mode != BudgetMode::Merge;
        let gaussian = merges && self.weights == MergeWeights::Gaussian;
        let inert = [
            (self.threshold != d.threshold && !scans, "threshold", SCAN_MODES),
            (self.compare_to != d.compare_to && !scans, "compare_to", SCAN_MODES),
            (self.similarity != d.similarity && !merges, "similarity", MERGING),
            (
                self.agree_on != d.agree_on && !self.merges_to_budget(),
                "agree_on",
                "budget_mode = merge (with merge = true)",
            ),
            (
                self.linkage != d.linkage && !self.merges_to_budget(),
                "linkage",
                "budget_mode = merge (with merge = true)",
            ),
            (
                self.similarity != d.similarity && self.linkage == Linkage::Ward,
                "similarity",
                "linkage = centroid (Ward's squared error does not depend on a centre)",
            ),
            (self.mass != d.mass && !merges, "mass", MERGING),
            (self.weights != d.weights && !merges, "weights", MERGING),
            (self.pivot != d.pivot && !merges, "pivot", MERGING),
            (self.count_weighted != d.count_weighted && !merges, "count_weighted", MERGING),
            (self.sigma != d.sigma && !gaussian, "sigma", "weights = gaussian (with merge = true)"),
            (
                self.sigma_floor != d.sigma_floor && !(gaussian && self.sigma == Sigma::Adaptive),
                "sigma_floor",
                "sigma = adaptive (with weights = gaussian, merge = true)",
            ),
            (
                self.seed != d.seed && !(merges && self.pivot == PivotRule::Random),
                "seed",
                "pivot = random (with merge = true)",
            ),
            (
                self.protect_window != d.protect_window && self.protect_by != ProtectBy::Window,
                "protect_window",
                "protect_by = window",
            ),
        ];
        match inert.into_iter().find(|(unused, ..)| *unused) {
            Some((_, name, read_by)) => Err(CompressError::invalid(
                name,
                format!(
                    "has no effect with budget_mode = {}{}: only {read_by} reads it",
                    self.budget_mode.name(),
                    if self.merge { "" } else { ", merge = false" }
                ),
            )),
            None => Ok(()),
        }
    }

    /// `(recent, selected)` shares for a head whose budget is `ratio` of its tokens.
    fn protected_shares(&self, ratio: f64) -> (f64, f64) {
        let (recent, selected) = if ratio >= 0.5 { (0.17, 0.12) } else { (0.08, 0.02) };
        (self.recent.unwrap_or(recent), self.selected.unwrap_or(selected))
    }

    /// Whether merging runs to the budget (`merge` mode with merging enabled).
    fn merges_to_budget(&self) -> bool {
        self.budget_mode == BudgetMode::Merge && self.merge
    }

    /// Whether eviction brings the head to its budget: `exact` mode, and `merge` mode with
    /// merging disabled (protection plus eviction).
    fn evicts(&self) -> bool {
        match self.budget_mode {
            BudgetMode::Exact => true,
            BudgetMode::Merge => !self.merge,
            BudgetMode::Threshold => false,
        }
    }

    /// The score that chooses protected tokens, `[len]`.
    fn protection_scores(&self, head: &HeadCache) -> Result<Vec<f32>> {
        match self.protect_by {
            ProtectBy::Accumulated => Ok(head
                .meta()
                .iter()
                .map(|m| match self.protect_score {
                    ProtectScore::Total => m.attention,
                    ProtectScore::PerToken => m.attention / m.count.max(1) as f32,
                })
                .collect()),
            ProtectBy::Window => {
                head.window_attention(self.protect_window).map(<[f32]>::to_vec).ok_or_else(|| {
                    CompressError::Shape(format!(
                        "protect_by = window needs the attention of the last {} prompt queries",
                        self.protect_window
                    ))
                })
            }
            ProtectBy::KeyDiff => Ok(keydiff_scores(&head.keys(), head.head_dim())),
        }
    }

    /// Tokens protected from merging and eviction, `protected[i]`, and whether the shares
    /// had to shrink to fit the budget. `tokens`: the prompt tokens the head's entries
    /// stand for.
    fn protect(&self, scores: &[f32], tokens: usize, budget: usize) -> (Vec<bool>, bool) {
        let n = scores.len();
        let of = match self.shares_of {
            SharesOf::Entries => n,
            SharesOf::Tokens => tokens.max(n),
        } as f64;
        let (recent_share, selected_share) = self.protected_shares(budget as f64 / of);
        let n_recent = ((recent_share * of).round() as usize).min(n);
        let n_selected = ((selected_share * of).round() as usize).min(n - n_recent);
        let mask = |recent: usize, selected: usize| protected_mask(scores, recent, selected);
        if self.merges_to_budget() {
            // Merging cannot go below the protected tokens plus one entry per run between
            // them: shrink both shares alike until that fits. With at most (B - 1) / 2
            // protected tokens it always does (P + runs <= 2P + 1), so bisect above that.
            let total = n_recent + n_selected;
            let split = |p: usize| {
                let recent = (p * n_recent + total / 2).checked_div(total).unwrap_or(0);
                (recent, p - recent)
            };
            let fits = |p: usize| {
                let (r, s) = split(p);
                min_reachable(&mask(r, s)) <= budget
            };
            if fits(total) {
                return (mask(n_recent, n_selected), false);
            }
            let (mut lo, mut hi) = (total.min(budget.saturating_sub(1) / 2), total);
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if fits(mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let (r, s) = split(lo);
            return (mask(r, s), true);
        }
        if self.evicts() {
            // Protected tokens are never evicted: the selected share gives way first, then
            // the recent window shrinks to the budget.
            let recent = n_recent.min(budget);
            let selected = n_selected.min(budget - recent);
            return (mask(recent, selected), (recent, selected) != (n_recent, n_selected));
        }
        (mask(n_recent, n_selected), false)
    }

    /// What an entry standing for `count` tokens weighs in a run (1 unless `count_weighted`).
    fn row_weight(&self, count: u32) -> f32 {
        if self.count_weighted {
            count.max(1) as f32
        } else {
            1.0
        }
    }

    /// Merge weights of `members` around `pivot`.
    fn weights(&self, head: &HeadCache, members: Range<usize>, pivot: usize) -> Vec<f32> {
        let n = members.len();
        if self.weights == MergeWeights::Uniform {
            let meta = head.meta();
            let w: Vec<f32> = members.map(|i| self.row_weight(meta[i].count)).collect();
            let total: f32 = w.iter().sum();
            return w.iter().map(|x| x / total).collect();
        }
        let kp = head.key(pivot);
        let sq_dist: Vec<f32> = members
            .clone()
            .map(|i| head.key(i).iter().zip(kp.iter()).map(|(a, b)| (a - b) * (a - b)).sum())
            .collect();
        let sigma = match self.sigma {
            Sigma::Fixed(s) => s,
            Sigma::Adaptive => {
                let mean = sq_dist.iter().map(|d| d.sqrt()).sum::<f32>() / (n - 1).max(1) as f32;
                mean.max(self.sigma_floor)
            }
        };
        let meta = head.meta();
        let g: Vec<f32> = sq_dist
            .iter()
            .zip(members)
            .map(|(d, i)| (-d / (2.0 * sigma * sigma)).exp() * self.row_weight(meta[i].count))
            .collect();
        let total: f32 = g.iter().sum();
        g.iter().map(|x| x / total).collect()
    }

    /// Runs of unprotected tokens to fold into one entry each, covering every unprotected
    /// index once.
    fn runs(&self, head: &HeadCache, protected: &[bool], budget: usize) -> Vec<Range<usize>> {
        let d = head.head_dim();
        if !self.merge {
            return (0..head.len()).filter(|&i| !protected[i]).map(|i| i..i + 1).collect();
        }
        let keys = head.keys();
        let center = (self.similarity == Similarity::Centered).then(|| mean_row(&keys, d));
        if self.merges_to_budget() {
            let weights: Option<Vec<f32>> = self
                .count_weighted
                .then(|| head.meta().iter().map(|m| self.row_weight(m.count)).collect());
            let values = (self.agree_on == AgreeOn::KeysAndValues).then(|| head.values());
            let scoring = RunScoring {
                center: center.as_deref(),
                row_weights: weights.as_deref(),
                values: values.as_deref(),
                linkage: self.linkage,
            };
            return merge_to_target(&keys, d, protected, budget, scoring);
        }
        match center {
            None => merging_sets(&keys, d, protected, self.threshold, self.compare_to),
            Some(c) => {
                let centered: Vec<f32> = keys
                    .chunks_exact(d)
                    .flat_map(|k| k.iter().zip(&c).map(|(x, m)| (*x as f64 - m) as f32))
                    .collect();
                merging_sets(&centered, d, protected, self.threshold, self.compare_to)
            }
        }
    }

    /// Folds each run of two or more tokens into one entry (Gaussian-weighted toward its
    /// pivot, with the mass rule applied); protected tokens and singletons stay as they
    /// are. Returns the new head and which of its entries are protected.
    fn fold(
        &self,
        id: HeadId,
        head: &HeadCache,
        protected: &[bool],
        runs: Vec<Range<usize>>,
        report: &mut HeadReport,
    ) -> Result<(HeadCache, Vec<bool>)> {
        let (n, d) = (head.len(), head.head_dim());
        let meta = head.meta();
        let mut rng = StdRng::seed_from_u64(self.seed ^ ((id.layer as u64) << 32 | id.head as u64));
        let mut out = Merged::with_capacity(n, d);
        let mut runs = runs.into_iter().peekable();
        let mut i = 0;
        while i < n {
            let run = match runs.next_if(|r| r.start == i) {
                Some(run) if run.len() > 1 => run,
                _ => {
                    out.push(&head.key(i), &head.value(i), meta[i], protected[i]);
                    i += 1;
                    continue;
                }
            };
            i = run.end;
            report.merge_sets += 1;
            report.merged_tokens += run.len();
            report.largest_set = report.largest_set.max(run.len());
            let pivot = match self.pivot {
                PivotRule::Attention => run
                    .clone()
                    .min_by(|&a, &b| {
                        meta[b].attention.total_cmp(&meta[a].attention).then(a.cmp(&b))
                    })
                    .unwrap_or(run.start),
                PivotRule::Random => rng.random_range(run.clone()),
            };
            let w = self.weights(head, run.clone(), pivot);
            let count: u32 = run.clone().map(|j| meta[j].count).sum();
            let (mut key, mut value) = (vec![0.0f32; d], vec![0.0f32; d]);
            for (j, wj) in run.clone().zip(&w) {
                key.iter_mut().zip(head.key(j).iter()).for_each(|(k, x)| *k += wj * x);
                value.iter_mut().zip(head.value(j).iter()).for_each(|(v, x)| *v += wj * x);
            }
            if self.mass == MassRule::ScaleValues {
                value.iter_mut().for_each(|v| *v *= count as f32);
            }
            let attention = run.clone().map(|j| meta[j].attention).sum();
            out.push(
                &key,
                &value,
                EntryMeta { position: meta[pivot].position, count, attention },
                false,
            );
        }
        let merged = head.with_entries(out.keys, out.values, out.meta)?;
        Ok((merged, out.protected))
    }
}

/// The entries of a head after merging, before they are written back.
struct Merged {
    /// `[len, head_dim]`
    keys: Vec<f32>,
    /// `[len, head_dim]`
    values: Vec<f32>,
    meta: Vec<EntryMeta>,
    protected: Vec<bool>,
}

impl Merged {
    fn with_capacity(n: usize, d: usize) -> Self {
        Self {
            keys: Vec::with_capacity(n * d),
            values: Vec::with_capacity(n * d),
            meta: Vec::with_capacity(n),
            protected: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, key: &[f32], value: &[f32], meta: EntryMeta, protected: bool) {
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
        self.meta.push(meta);
        self.protected.push(protected);
    }
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// `protected[i]`: the last `recent` tokens plus the `selected` highest `scores` before them.
fn protected_mask(scores: &[f32], recent: usize, selected: usize) -> Vec<bool> {
    let n = scores.len();
    let mut protected = vec![false; n];
    protected[n - recent..].iter_mut().for_each(|p| *p = true);
    for i in top_k(0..n - recent, |i| scores[i], selected) {
        protected[i] = true;
    }
    protected
}

/// Keeps the protected entries and the `budget - protected` unprotected entries with the
/// highest accumulated attention; on equal attention the earlier entry stays.
fn evict_to_budget(head: &mut HeadCache, protected: &[bool], budget: usize) {
    if head.len() <= budget {
        return;
    }
    let meta = head.meta();
    let unprotected: Vec<usize> = (0..head.len()).filter(|&j| !protected[j]).collect();
    let evict = head.len() - budget;
    let keep_unprotected = top_k(
        unprotected.iter().copied(),
        |j| meta[j].attention,
        unprotected.len().saturating_sub(evict),
    );
    let mut keep: Vec<usize> =
        (0..head.len()).filter(|&j| protected[j]).chain(keep_unprotected).collect();
    keep.sort_unstable();
    head.retain_indices(&keep);
}

impl CompressionMethod for KvMergerConfig {
    fn name(&self) -> &'static str {
        "kvmerger"
    }

    fn bounded_by_budget(&self) -> bool {
        self.budget_mode != BudgetMode::Threshold
    }

    fn stats(&self) -> StatsRequest {
        let windows = match self.protect_by {
            ProtectBy::Accumulated | ProtectBy::KeyDiff => Windows::default(),
            ProtectBy::Window => Windows::one(self.protect_window),
        };
        // Accumulated attention always: it chooses the pivots.
        StatsRequest { accumulated: true, windows, ..StatsRequest::default() }
    }

    /// Merging happens once, after the prompt; decode steps only append (no
    /// [`CompressionMethod::after_step`]), so they need no statistic.
    fn decode_stats(&self) -> StatsRequest {
        StatsRequest::default()
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn layer_budget_entries(&self, layer: usize, _n_layers: usize, prompt_len: usize) -> usize {
        match self.layer_budgets.as_ref().and_then(|b| b.get(layer)) {
            Some(&ratio) => Budget::Ratio(ratio).entries(prompt_len),
            None => self.budget_entries(prompt_len),
        }
    }

    fn log_count_bias(&self) -> bool {
        self.mass == MassRule::LogCount
    }

    fn computes_rows(&self) -> bool {
        self.merge
    }

    fn decode_bound_refusal(&self) -> Option<String> {
        if self.budget_mode == BudgetMode::Threshold {
            return Some(
                "kvmerger in threshold mode keeps what its threshold keeps, not a number of \
                 entries: it cannot hold a bound while decoding; use a budget mode"
                    .into(),
            );
        }
        (self.protect_by == ProtectBy::Window).then(|| {
            "kvmerger with protect_by = window protects by the attention of the prompt's last \
             queries, which decoding does not record; use protect_by = accumulated"
                .to_string()
        })
    }

    /// Compresses the head again, to the bound less a sixteenth of it, so that merging runs
    /// once every `max_entries / 16` steps rather than at each. The recent window and the
    /// high-attention entries are protected as after the prompt, so what merges (or, without
    /// merging, leaves) is the older unprotected part.
    fn bound(&self, id: HeadId, head: &mut HeadCache, max_entries: usize) -> Result<()> {
        let target = (max_entries - max_entries / 16).max(1);
        self.compress(id, head, target).map(|_| ())
    }

    fn compress(&self, id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        let before = head.len();
        let bounded = self.budget_mode != BudgetMode::Threshold;
        if before == 0 || (bounded && before <= budget) {
            // Within budget: nothing to compress (as for every other method).
            return Ok(HeadReport { before, after: before, ..Default::default() });
        }
        let scores = self.protection_scores(head)?;
        let tokens = head.meta().iter().map(|m| m.count as usize).sum();
        let (protected, clamped) = self.protect(&scores, tokens, budget);
        let runs = self.runs(head, &protected, budget);
        let mut report =
            HeadReport { before, clamped: clamped.then_some("protected"), ..Default::default() };
        let (merged, protected) = self.fold(id, head, &protected, runs, &mut report)?;
        *head = merged;
        if self.evicts() {
            evict_to_budget(head, &protected, budget);
        }
        head.shrink_to_fit();
        report.after = head.len();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::test_util::random_head;
    use crate::KvDtype;

    const ID: HeadId = HeadId { layer: 0, head: 0 };

    /// Keys that form runs of near-identical vectors, so the default threshold merges them.
    fn runs_head(n: usize, d: usize, run: usize) -> HeadCache {
        let mut base = random_head(n, d, 7);
        let noise = random_head(n, d, 8);
        let mut keys = Vec::new();
        for i in 0..n {
            let anchor = base.key(i / run * run).to_vec();
            keys.extend(anchor.iter().zip(noise.key(i).iter()).map(|(a, e)| a + 0.01 * e));
        }
        let values = base.values().to_vec();
        let meta = base.meta().to_vec();
        base = HeadCache::from_parts(d, KvDtype::F32, keys, values, meta).unwrap();
        base
    }

    /// The `exact` ablation (threshold merging, then eviction).
    fn cfg(budget: Budget) -> KvMergerConfig {
        KvMergerConfig { budget, budget_mode: BudgetMode::Exact, ..Default::default() }
    }

    /// The default `merge` mode.
    fn merge_cfg(budget: Budget) -> KvMergerConfig {
        KvMergerConfig { budget, ..Default::default() }
    }

    /// Checks a head compressed without eviction against the original: entries cover the
    /// original tokens in order, protected tokens are untouched, and every other entry is
    /// the Gaussian-weighted merge of its run toward the run's highest-attention member.
    fn assert_runs_are_gaussian_merges(
        original: &HeadCache,
        merged: &HeadCache,
        protected: &[bool],
        sigma: f32,
        mass: MassRule,
    ) {
        let d = original.head_dim();
        let om = original.meta();
        let mut start = 0;
        for (e, m) in merged.meta().iter().enumerate() {
            let run = start..start + m.count as usize;
            start = run.end;
            if run.len() == 1 {
                assert_eq!(merged.key(e), original.key(run.start));
                assert_eq!(merged.value(e), original.value(run.start));
                assert_eq!(*m, om[run.start]);
                continue;
            }
            assert!(run.clone().all(|i| !protected[i]), "run {run:?} holds a protected token");
            let pivot = run
                .clone()
                .max_by(|&a, &b| om[a].attention.total_cmp(&om[b].attention).then(b.cmp(&a)))
                .unwrap();
            assert_eq!(m.position, pivot);
            let g: Vec<f64> = run
                .clone()
                .map(|i| {
                    let dist: f64 = original
                        .key(i)
                        .iter()
                        .zip(original.key(pivot).iter())
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum();
                    (-dist / (2.0 * (sigma as f64).powi(2))).exp()
                })
                .collect();
            let total: f64 = g.iter().sum();
            let scale = if mass == MassRule::ScaleValues { run.len() as f64 } else { 1.0 };
            for t in 0..d {
                let k: f64 =
                    run.clone().zip(&g).map(|(i, w)| w / total * original.key(i)[t] as f64).sum();
                let v: f64 =
                    run.clone().zip(&g).map(|(i, w)| w / total * original.value(i)[t] as f64).sum();
                assert!((merged.key(e)[t] as f64 - k).abs() < 1e-4, "key of run {run:?}");
                assert!((merged.value(e)[t] as f64 - v * scale).abs() < 1e-4 * scale);
            }
            let a: f32 = run.clone().map(|i| om[i].attention).sum();
            assert!((m.attention - a).abs() < 1e-3);
        }
        assert_eq!(start, original.len(), "every token is in exactly one entry");
        for (i, p) in protected.iter().enumerate() {
            if *p {
                assert!(merged.meta().iter().any(|m| m.position == i && m.count == 1));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn merge_mode_holds_exactly_the_budget_by_merging_runs(
            n in 1usize..150,
            share in 0.01f64..1.0,
            seed in 0u64..1000,
            mass_rule in 0usize..3,
        ) {
            let mass = [MassRule::ScaleValues, MassRule::None, MassRule::LogCount][mass_rule];
            let original = runs_head(n, 6, 1 + seed as usize % 7);
            let c = KvMergerConfig {
                mass,
                sigma: Sigma::Fixed(0.7),
                seed,
                ..merge_cfg(Budget::Ratio(share))
            };
            let budget = c.budget_entries(n);
            let mut head = original.clone();
            let report = c.compress(ID, &mut head, budget).unwrap();
            proptest::prop_assert_eq!(head.len(), budget);
            proptest::prop_assert_eq!(report.after, budget);
            let scores: Vec<f32> = original.meta().iter().map(|m| m.attention).collect();
            let (protected, _) = c.protect(&scores, scores.len(), budget);
            if budget < n {
                assert_runs_are_gaussian_merges(&original, &head, &protected, 0.7, mass);
            }
        }
    }

    #[test]
    fn merge_mode_merges_the_most_similar_neighbours_first() {
        // Runs of ten near-identical keys, nothing protected: at ten entries per hundred
        // tokens, each run becomes exactly one entry.
        let original = runs_head(100, 8, 10);
        let c = KvMergerConfig {
            recent: Some(0.0),
            selected: Some(0.0),
            ..merge_cfg(Budget::Ratio(0.1))
        };
        let mut head = original.clone();
        let r = c.compress(ID, &mut head, 10).unwrap();
        assert_eq!((head.len(), r.merge_sets, r.largest_set, r.clamped), (10, 10, 10, None));
        assert!(head.meta().iter().all(|m| m.count == 10));
    }

    #[test]
    fn merge_mode_shrinks_protected_shares_that_leave_no_room_and_reports_it() {
        for (n, budget) in [(3, 1), (7, 2), (20, 3), (100, 5), (100, 20)] {
            let original = random_head(n, 4, n as u64);
            let c = KvMergerConfig {
                recent: Some(0.3),
                selected: Some(0.3),
                ..merge_cfg(Budget::Tokens(budget))
            };
            let mut head = original.clone();
            let r = c.compress(ID, &mut head, budget).unwrap();
            assert_eq!(head.len(), budget, "{n} tokens, budget {budget}");
            assert_eq!(r.clamped, Some("protected"), "{n} tokens, budget {budget}");
            assert_eq!(head.meta().iter().map(|m| m.count as usize).sum::<usize>(), n);
        }
        // Shares that fit are left alone.
        let mut head = random_head(100, 4, 1);
        let r = merge_cfg(Budget::Ratio(0.5)).compress(ID, &mut head, 50).unwrap();
        assert_eq!((head.len(), r.clamped), (50, None));
    }

    #[test]
    fn centered_similarity_ignores_a_direction_all_keys_share() {
        // Keys = a large shared direction + small random parts: plain cosine sees every
        // neighbour as similar, centered cosine sees the random parts.
        let d = 8;
        let base = random_head(100, d, 12);
        let keys: Vec<f32> = base
            .keys()
            .chunks_exact(d)
            .flat_map(|k| {
                k.iter().enumerate().map(|(t, x)| 0.2 * x + if t == 0 { 5.0 } else { 0.0 })
            })
            .collect();
        let head = HeadCache::from_parts(
            d,
            KvDtype::F32,
            keys,
            base.values().to_vec(),
            base.meta().to_vec(),
        )
        .unwrap();
        let run = |similarity| {
            let c = KvMergerConfig {
                budget_mode: BudgetMode::Threshold,
                similarity,
                ..cfg(Budget::Ratio(0.5))
            };
            let mut h = head.clone();
            c.compress(ID, &mut h, 50).unwrap().merged_tokens
        };
        let (cosine, centered) = (run(Similarity::Cosine), run(Similarity::Centered));
        // 71 unprotected tokens; only those left alone between protected ones stay single.
        assert!(cosine > 60, "plain cosine merges {cosine} tokens");
        assert!(centered < cosine / 2, "centered merges {centered} tokens, cosine {cosine}");
    }

    #[test]
    fn protect_by_window_protects_the_last_queries_favourites() {
        let original = random_head(100, 4, 21);
        let accumulated: Vec<f32> = original.meta().iter().map(|m| m.attention).collect();
        // The window statistic ranks tokens the other way round.
        let window: Vec<f32> = accumulated.iter().map(|a| 5.0 - a).collect();
        let mut with_window = original.clone();
        with_window.set_window_attention(16, window.clone()).unwrap();
        let c = KvMergerConfig {
            protect_by: ProtectBy::Window,
            protect_window: 16,
            ..merge_cfg(Budget::Ratio(0.5))
        };
        assert!(c.stats().windows.contains(16) && c.stats().accumulated);
        let plain = merge_cfg(Budget::Ratio(0.5));
        assert!(plain.stats().windows.is_empty());
        // 17 recent tokens, 12 selected before them.
        let by_window = top_k(0..83, |i| window[i], 12);
        let by_accumulated = top_k(0..83, |i| accumulated[i], 12);
        assert!(by_window.iter().all(|i| !by_accumulated.contains(i)));
        for (config, head, favourites) in
            [(&c, with_window.clone(), &by_window), (&plain, original.clone(), &by_accumulated)]
        {
            let mut head = head;
            config.compress(ID, &mut head, 50).unwrap();
            for &i in favourites {
                assert!(
                    head.meta().iter().any(|m| m.position == i && m.count == 1),
                    "{:?}: token {i} is protected",
                    config.protect_by
                );
            }
        }
        let mut missing = original.clone();
        let err = c.compress(ID, &mut missing, 50).unwrap_err();
        assert!(err.to_string().contains("16"), "{err}");
    }

    #[test]
    fn exact_mode_hits_the_budget_for_every_budget() {
        for ratio in [1.0, 0.5, 0.35, 0.2] {
            // Random keys rarely pass the threshold: eviction brings the head to its budget.
            let mut head = random_head(100, 8, 4);
            let c = cfg(Budget::Ratio(ratio));
            let b = c.budget_entries(100).min(100);
            let r = c.compress(ID, &mut head, b).unwrap();
            assert_eq!(head.len(), b, "ratio {ratio}");
            assert_eq!(r.after, b);
            assert!(head.meta().windows(2).all(|w| w[0].position < w[1].position));
        }
    }

    #[test]
    fn tiny_budgets_clamp_the_protected_shares_to_the_budget() {
        // B = 5 of 100: the 8% recent + 2% selected shares do not fit. The selected share
        // gives way first, then the recent window shrinks to the budget.
        let mut head = runs_head(100, 8, 10);
        cfg(Budget::Ratio(0.05)).compress(ID, &mut head, 5).unwrap();
        assert_eq!(
            head.meta().iter().map(|m| m.position).collect::<Vec<_>>(),
            vec![95, 96, 97, 98, 99]
        );
        let mut head = random_head(100, 8, 1);
        let c =
            KvMergerConfig { recent: Some(0.05), selected: Some(0.1), ..cfg(Budget::Ratio(0.1)) };
        let top: Vec<usize> = crate::methods::select::top_k(0..95, |i| head.meta()[i].attention, 5);
        c.compress(ID, &mut head, 10).unwrap();
        let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
        assert_eq!(kept, top.into_iter().chain(95..100).collect::<Vec<_>>());
    }

    #[test]
    fn exact_mode_keeps_fewer_when_merging_alone_goes_below_the_budget() {
        // Runs of ten near-identical keys: 71 unprotected tokens, cut by the 12 selected
        // ones, merge into at most 20 entries.
        let mut head = runs_head(100, 8, 10);
        let r = cfg(Budget::Ratio(0.5)).compress(ID, &mut head, 50).unwrap();
        assert!(head.len() < 50 && r.merge_sets > 5, "kept {}", head.len());
        assert_eq!(r.after, head.len());
        assert_eq!(
            head.meta().iter().map(|m| m.count).sum::<u32>(),
            100,
            "nothing had to be evicted"
        );
    }

    #[test]
    fn threshold_mode_keeps_what_merging_leaves() {
        let mut head = runs_head(100, 8, 4);
        let c = KvMergerConfig { budget_mode: BudgetMode::Threshold, ..cfg(Budget::Ratio(0.5)) };
        let r = c.compress(ID, &mut head, 50).unwrap();
        assert!(r.merge_sets > 0 && head.len() < 100);
        assert_eq!(
            head.meta().iter().map(|m| m.count).sum::<u32>(),
            100,
            "no token is lost without eviction"
        );
    }

    #[test]
    fn merged_entry_is_the_gaussian_weighted_combination_with_the_pivot_heaviest() {
        let d = 4;
        let mut head = runs_head(12, d, 12);
        // Nothing protected, one set of 12 tokens.
        let c = KvMergerConfig {
            budget_mode: BudgetMode::Threshold,
            recent: Some(0.0),
            selected: Some(0.0),
            threshold: -2.0,
            sigma: Sigma::Fixed(0.02),
            mass: MassRule::None,
            ..cfg(Budget::Ratio(1.0))
        };
        let original = head.clone();
        let pivot = (0..12)
            .max_by(|&a, &b| original.meta()[a].attention.total_cmp(&original.meta()[b].attention))
            .unwrap();
        c.compress(ID, &mut head, 12).unwrap();
        assert_eq!(head.len(), 1);
        let g: Vec<f32> = (0..12)
            .map(|i| {
                let dist: f32 = original
                    .key(i)
                    .iter()
                    .zip(original.key(pivot).iter())
                    .map(|(a, b)| (a - b).powi(2))
                    .sum();
                (-dist / (2.0 * 0.02 * 0.02)).exp()
            })
            .collect();
        let total: f32 = g.iter().sum();
        for t in 0..d {
            let k: f32 = (0..12).map(|i| g[i] / total * original.key(i)[t]).sum();
            let v: f32 = (0..12).map(|i| g[i] / total * original.value(i)[t]).sum();
            assert!((head.key(0)[t] - k).abs() < 1e-5 && (head.value(0)[t] - v).abs() < 1e-5);
        }
        assert!(
            g.iter().enumerate().all(|(i, x)| i == pivot || *x < g[pivot]),
            "pivot weight is the largest"
        );
        assert_eq!(head.meta()[0].position, pivot);
        assert_eq!(head.meta()[0].count, 12);
        let a: f32 = original.meta().iter().map(|m| m.attention).sum();
        assert!((head.meta()[0].attention - a).abs() < 1e-5);
    }

    /// Attention output of one query over a head, with `ln(count)` on the logits if `bias`.
    fn attend(q: &[f32], head: &HeadCache, bias: bool) -> Vec<f32> {
        let d = head.head_dim();
        let logits: Vec<f32> = (0..head.len())
            .map(|i| {
                let s: f32 = q.iter().zip(head.key(i).iter()).map(|(a, b)| a * b).sum::<f32>()
                    / (d as f32).sqrt();
                s + if bias { (head.meta()[i].count as f32).ln() } else { 0.0 }
            })
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f32 = e.iter().sum();
        (0..d).map(|t| (0..head.len()).map(|i| e[i] / total * head.value(i)[t]).sum()).collect()
    }

    #[test]
    fn key_diff_protection_picks_the_distinctive_key_not_the_most_attended() {
        // Twenty tokens share one key but token 5, which points elsewhere; token 10 has the
        // most attention. One token is selected, none recent.
        let d = 4;
        let mut keys = [0.3f32, -0.7, 0.2, 0.5].repeat(20);
        keys[5 * d..6 * d].copy_from_slice(&[-0.5, 0.1, 0.8, -0.2]);
        let meta = (0..20)
            .map(|i| EntryMeta {
                position: i,
                count: 1,
                attention: if i == 10 { 5.0 } else { 1.0 },
            })
            .collect();
        let values = random_head(20, d, 4).values().to_vec();
        let head = HeadCache::from_parts(d, KvDtype::F32, keys, values, meta).unwrap();
        let selected = |protect_by| {
            let c = KvMergerConfig {
                protect_by,
                recent: Some(0.0),
                selected: Some(0.05),
                ..merge_cfg(Budget::Tokens(10))
            };
            protected_indices(&c, &head, 20, 10)
        };
        assert_eq!(selected(ProtectBy::Accumulated), [10]);
        assert_eq!(selected(ProtectBy::KeyDiff), [5]);
    }

    #[test]
    fn agreeing_on_values_keeps_runs_with_different_values_apart() {
        // Six tokens with one key; the first three carry value `a`, the last three an
        // orthogonal `b`. Keys alone tie everywhere (the leftmost pair merges first), so the
        // first entry swallows both values; agreeing on values too splits at the change.
        let d = 4;
        let (a, b) = ([1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]);
        let keys = [0.3f32, -0.7, 0.2, 0.5].repeat(6);
        let values = [a.repeat(3), b.repeat(3)].concat();
        let meta = (0..6).map(|i| EntryMeta { position: i, count: 1, attention: 1.0 }).collect();
        let head = HeadCache::from_parts(d, KvDtype::F32, keys, values, meta).unwrap();
        let merged = |agree_on| {
            let c = KvMergerConfig {
                agree_on,
                recent: Some(0.0),
                selected: Some(0.0),
                ..merge_cfg(Budget::Tokens(2))
            };
            let mut h = head.clone();
            c.compress(ID, &mut h, 2).unwrap();
            let counts: Vec<u32> = h.meta().iter().map(|m| m.count).collect();
            (counts, h.value(0).to_vec())
        };
        let (counts, first) = merged(AgreeOn::Keys);
        assert_eq!(counts, [5, 1]);
        assert!(first[1] > 0.1, "keys alone blur b into the first entry: {first:?}");
        let (counts, first) = merged(AgreeOn::KeysAndValues);
        assert_eq!(counts, [3, 3]);
        assert_eq!(first, a);
        let exact = KvMergerConfig { agree_on: AgreeOn::KeysAndValues, ..cfg(Budget::Tokens(2)) };
        assert!(exact.validate().unwrap_err().to_string().contains("agree_on"));
    }

    #[test]
    fn log_count_keeps_attention_exact_for_identical_entries_and_none_does_not() {
        let d = 4;
        let base = random_head(10, d, 3);
        // Tokens 2..7 are identical copies of token 2.
        let mut keys = base.keys().to_vec();
        let mut values = base.values().to_vec();
        for i in 3..7 {
            keys.copy_within(2 * d..3 * d, i * d);
            values.copy_within(2 * d..3 * d, i * d);
        }
        let head =
            HeadCache::from_parts(d, KvDtype::F32, keys, values, base.meta().to_vec()).unwrap();
        let q = [0.9, -0.4, 1.3, 0.2];
        let exact = attend(&q, &head, false);
        for (mass, should_match) in [(MassRule::LogCount, true), (MassRule::None, false)] {
            let mut merged = head.clone();
            let c = KvMergerConfig {
                budget_mode: BudgetMode::Threshold,
                recent: Some(0.0),
                selected: Some(0.0),
                threshold: 0.999,
                mass,
                ..cfg(Budget::Ratio(1.0))
            };
            c.compress(ID, &mut merged, 10).unwrap();
            assert_eq!(merged.len(), 6, "the five copies fold into one entry");
            let out = attend(&q, &merged, c.log_count_bias());
            let err: f32 = out.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert_eq!(err < 1e-5, should_match, "{mass:?}: max error {err}");
        }
    }

    #[test]
    fn extreme_thresholds_merge_nothing_or_every_run() {
        let c = |t| KvMergerConfig {
            budget_mode: BudgetMode::Threshold,
            threshold: t,
            ..cfg(Budget::Ratio(0.5))
        };
        let mut head = random_head(100, 8, 2);
        let r = c(1.5).compress(ID, &mut head, 50).unwrap();
        assert_eq!((r.merge_sets, head.len()), (0, 100));
        let mut head = random_head(100, 8, 2);
        let r = c(-1.5).compress(ID, &mut head, 50).unwrap();
        // Protected: 17 recent + 12 selected; everything else merges into runs between them.
        let protected = 29;
        // Every run of unprotected tokens became one entry: sets of two or more, or singletons.
        let singletons = 100 - protected - r.merged_tokens;
        assert_eq!(head.len(), protected + r.merge_sets + singletons);
        assert!(
            singletons <= 12 && r.merge_sets <= 13,
            "runs are only broken by the 12 selected tokens"
        );
        assert_eq!(head.meta().iter().map(|m| m.count).sum::<u32>(), 100);
    }

    /// `head` with each entry standing for `count(i)` tokens and receiving `attention(i)`.
    fn with_meta(
        head: &HeadCache,
        count: impl Fn(usize) -> u32,
        attention: impl Fn(usize) -> f32,
    ) -> HeadCache {
        let meta: Vec<EntryMeta> = (0..head.len())
            .map(|i| EntryMeta { position: i, count: count(i), attention: attention(i) })
            .collect();
        let (keys, values) = (head.keys().to_vec(), head.values().to_vec());
        HeadCache::from_parts(head.head_dim(), KvDtype::F32, keys, values, meta).unwrap()
    }

    /// The entries `c` protects in `head`, standing for `tokens` prompt tokens, at `budget`.
    fn protected_indices(
        c: &KvMergerConfig,
        head: &HeadCache,
        tokens: usize,
        budget: usize,
    ) -> Vec<usize> {
        let scores = c.protection_scores(head).unwrap();
        let (mask, _) = c.protect(&scores, tokens, budget);
        (0..head.len()).filter(|&i| mask[i]).collect()
    }

    /// Length of the protected run at the end of a mask: the recent window.
    fn recent_window(protected: &[bool]) -> usize {
        protected.iter().rev().take_while(|&&p| p).count()
    }

    #[test]
    fn shares_of_tokens_protects_what_the_prompt_compressed_once_would() {
        // 100 entries standing for 400 tokens, budget 60: of the entries the budget is 60%
        // (shares 17% and 12% of 100); of the tokens 15% (shares 8% and 2% of 400).
        let head = with_meta(&random_head(100, 4, 3), |_| 4, |i| i as f32 % 7.0);
        let scores: Vec<f32> = head.meta().iter().map(|m| m.attention).collect();
        let of = |shares_of| KvMergerConfig { shares_of, ..merge_cfg(Budget::Tokens(60)) };
        let (entries, _) = of(SharesOf::Entries).protect(&scores, 400, 60);
        let (tokens, _) = of(SharesOf::Tokens).protect(&scores, 400, 60);
        assert_eq!(recent_window(&entries), 17);
        assert_eq!(recent_window(&tokens), 32);
        assert_eq!(tokens.iter().filter(|&&p| p).count(), 32 + 8);
        // Where every entry is one token (a prompt compressed once), the two agree.
        for budget in [10, 35, 60] {
            let a = of(SharesOf::Entries).protect(&scores, 100, budget);
            assert_eq!(a, of(SharesOf::Tokens).protect(&scores, 100, budget), "{budget}");
        }
    }

    #[test]
    fn per_token_attention_keeps_a_merged_entry_from_winning_protection_by_its_size() {
        // Entry 5 stands for 10 tokens with 5.0 in all (0.5 each); entry 20 is one token
        // with 2.0; every other entry one token with 1.0. One entry is selected.
        let head = with_meta(
            &random_head(40, 4, 5),
            |i| if i == 5 { 10 } else { 1 },
            |i| match i {
                5 => 5.0,
                20 => 2.0,
                _ => 1.0,
            },
        );
        let selected = |protect_score| {
            let c = KvMergerConfig {
                protect_score,
                recent: Some(0.0),
                selected: Some(1.0 / 40.0),
                ..merge_cfg(Budget::Tokens(30))
            };
            protected_indices(&c, &head, 49, 30)
        };
        assert_eq!(selected(ProtectScore::Total), [5]);
        assert_eq!(selected(ProtectScore::PerToken), [20]);
    }

    #[test]
    fn count_weighted_entries_weigh_as_the_tokens_they_stand_for() {
        // Two entries with the same key (the Gaussian kernel gives both 1): one stands for 3
        // tokens, the other for 1.
        let base = random_head(2, 4, 9);
        let key = base.key(0).to_vec();
        let keys = [key.clone(), key].concat();
        let meta = vec![
            EntryMeta { position: 0, count: 3, attention: 1.0 },
            EntryMeta { position: 1, count: 1, attention: 0.5 },
        ];
        let head =
            HeadCache::from_parts(4, KvDtype::F32, keys, base.values().to_vec(), meta).unwrap();
        for weights in [MergeWeights::Gaussian, MergeWeights::Uniform] {
            let w = |count_weighted| {
                let c = KvMergerConfig { weights, count_weighted, ..Default::default() };
                c.weights(&head, 0..2, 0)
            };
            assert_eq!(w(false), [0.5, 0.5], "{weights:?}");
            assert_eq!(w(true), [0.75, 0.25], "{weights:?}");
        }
    }

    #[test]
    fn a_bound_while_decoding_merges_below_it_and_keeps_every_token() {
        let c = merge_cfg(Budget::Ratio(0.5));
        assert_eq!(c.decode_bound_refusal(), None);
        let mut head = random_head(100, 4, 11);
        c.bound(ID, &mut head, 64).unwrap();
        // A sixteenth of the bound is freed at once, so the next merge is 4 steps away.
        assert_eq!(head.len(), 60);
        assert_eq!(head.meta().iter().map(|m| m.count).sum::<u32>(), 100);
        assert_eq!(head.meta().last().unwrap().position, 99, "the newest entry stays");
        let threshold = KvMergerConfig { budget_mode: BudgetMode::Threshold, ..c };
        assert!(threshold.decode_bound_refusal().unwrap().contains("threshold"));
    }

    #[test]
    fn ablations_are_parameters() {
        let base = runs_head(60, 8, 5);
        let run = |c: KvMergerConfig| {
            let mut h = base.clone();
            c.compress(ID, &mut h, 30).unwrap();
            h
        };
        let default = run(cfg(Budget::Ratio(0.5)));
        let uniform =
            run(KvMergerConfig { weights: MergeWeights::Uniform, ..cfg(Budget::Ratio(0.5)) });
        let random =
            run(KvMergerConfig { pivot: PivotRule::Random, seed: 1, ..cfg(Budget::Ratio(0.5)) });
        let no_merge = run(KvMergerConfig { merge: false, ..cfg(Budget::Ratio(0.5)) });
        assert_ne!(default.keys(), uniform.keys());
        assert_ne!(default.meta(), random.meta());
        assert!(
            no_merge.meta().iter().all(|m| m.count == 1),
            "no merging: only protection and eviction"
        );
        assert_eq!(no_merge.len(), 30);
    }

    #[test]
    fn invalid_parameters_are_named() {
        let err = KvMergerConfig { sigma: Sigma::Fixed(-1.0), ..Default::default() }
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("sigma"));
        let err =
            KvMergerConfig { recent: Some(1.5), ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("recent"));
        let err = KvMergerConfig { layer_budgets: Some(vec![0.5, 0.0]), ..Default::default() }
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("layer_budgets"));
    }

    #[test]
    fn sigma_reads_numbers_tags_and_adaptive() {
        let s: Sigma = serde_json::from_str("5").unwrap();
        assert_eq!(s, Sigma::Fixed(5.0));
        let s: Sigma = serde_json::from_str(r#"{"fixed": 2.5}"#).unwrap();
        assert_eq!(s, Sigma::Fixed(2.5));
        let s: Sigma = serde_json::from_str(r#""adaptive""#).unwrap();
        assert_eq!(s, Sigma::Adaptive);
    }
}
