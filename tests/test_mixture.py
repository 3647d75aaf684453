"Mixture: weights, Theorem 3.2, CoA-weights fitting, out-class name sets."
import math
import pytest, torch
import torch.nn.functional as F
from cocoamix.losses import entropy, entropy_hinge
from cocoamix.mixture import (MixtureWeights, naive_mix, in_domain_mask, coa_weights_loss, coa_weights_out_loss,
                              fit_coa_weights, out_class_names)


def random_mask(p, c, g):
    m = torch.rand(p, c, generator=g) < 0.4
    m[0] = False  # t_0 is never in domain
    return m


def test_mixture_ce_never_exceeds_weighted_component_ce():
    "Theorem 3.2 (Jensen): CE(sum_i pi_i z_i) <= sum_i pi_i CE(z_i) per sample, for weights that sum to 1."
    g = torch.Generator().manual_seed(0)
    for trial in range(500):
        p, n, c = int(torch.randint(2, 6, (1,), generator=g)), 8, int(torch.randint(2, 20, (1,), generator=g))
        z = torch.randn(p, n, c, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g) * 30 + 0.1)
        y = torch.randint(0, c, (n,), generator=g)
        pi = torch.rand(p, generator=g, dtype=torch.float64) ** 3  # skewed weights too
        pi = pi / pi.sum()
        mix_ce = F.cross_entropy((pi[:, None, None] * z).sum(0), y, reduction='none')
        bound = sum(pi[i] * F.cross_entropy(z[i], y, reduction='none') for i in range(p))
        assert (mix_ce <= bound + 1e-9).all(), trial


def test_theorem_with_module_weights_on_base_and_new_class_lists():
    "Per-class-domain weights are constant over a class list that is all in Y_1 (base) or all out (new): bound holds."
    g = torch.Generator().manual_seed(1)
    for trial in range(200):
        p, n, c = 2, 16, int(torch.randint(2, 15, (1,), generator=g))
        mw = MixtureWeights(p)
        with torch.no_grad():
            mw.a_in.normal_(0, 2, generator=g); mw.a_out.normal_(0, 2, generator=g)
        z, y = torch.randn(p, n, c, generator=g, dtype=torch.float64) * 10, torch.randint(0, c, (n,), generator=g)
        for in_y1 in (True, False):  # base classes (all in Y_1) / new classes (all out)
            mask = torch.zeros(p, c, dtype=torch.bool); mask[1] = in_y1
            W = mw.weights(mask).double()
            mix_ce = F.cross_entropy(mw.mix(z, mask), y, reduction='none')
            bound = sum(W[i, 0] * F.cross_entropy(z[i], y, reduction='none') for i in range(p))
            assert (mix_ce <= bound + 1e-9).all(), trial


def test_theorem_fails_for_class_dependent_weights_in_one_softmax():
    "Documented limit: with weights that differ across the classes of one softmax, no convex bound holds."
    g = torch.Generator().manual_seed(2)
    violations = 0
    for _ in range(300):
        p, n, c = 3, 8, 6
        z, y = torch.randn(p, n, c, generator=g, dtype=torch.float64) * 10, torch.randint(0, c, (n,), generator=g)
        pi = torch.rand(p, c, generator=g, dtype=torch.float64) ** 3
        pi = pi / pi.sum(0)
        mix_ce = F.cross_entropy((pi[:, None] * z).sum(0), y, reduction='none')
        worst = torch.stack([F.cross_entropy(z[i], y, reduction='none') for i in range(p)]).max(0).values
        violations += int((mix_ce > worst + 1e-9).sum())
    assert violations > 0  # the mixture can be worse than every component


def test_weights_sum_to_one_and_follow_domains():
    g = torch.Generator().manual_seed(2)
    mw = MixtureWeights(4)
    with torch.no_grad():
        mw.a_in.normal_(0, 3, generator=g); mw.a_out.normal_(0, 3, generator=g)
    mask = random_mask(4, 30, g)
    W = mw.weights(mask)
    assert W.shape == (4, 30) and (W > 0).all()
    torch.testing.assert_close(W.sum(0), torch.ones(30))
    for l in range(30):
        a = torch.where(mask[:, l], mw.a_in, mw.a_out)
        torch.testing.assert_close(W[:, l], a.softmax(0))
    out_cols = ~mask.any(0)
    assert out_cols.any()
    torch.testing.assert_close(W[:, out_cols], mw.pi_out()[:, None].expand(-1, int(out_cols.sum())))
    torch.testing.assert_close(mw.pi_in().sum(), torch.tensor(1.0))


def test_zero_init_is_naive_ensemble():
    mw = MixtureWeights(3)
    assert [n for n, _ in mw.named_parameters()] == ['a_in', 'a_out']
    assert (mw.a_in == 0).all() and (mw.a_out == 0).all()
    mask = in_domain_mask([set(), {'a', 'b'}, {'c'}], ['a', 'b', 'c', 'd'])
    z = torch.randn(3, 10, 4)
    torch.testing.assert_close(mw.mix(z, mask), naive_mix(z))
    torch.testing.assert_close(mw(z, mask), MixtureWeights.naive_mix(z))
    torch.testing.assert_close(naive_mix(z), z.mean(0))


def test_in_domain_mask():
    m = in_domain_mask([set(), {'Golden_Retriever', 'cat'}], ['golden retriever', 'CAT', 'dog'])
    assert m.dtype == torch.bool and m.tolist() == [[False] * 3, [True, True, False]]
    assert in_domain_mask([set()], ['a', 'b']).shape == (1, 2)
    with pytest.raises(ValueError, match='t_0'): in_domain_mask([{'cat'}], ['cat'])
    with pytest.raises(ValueError): MixtureWeights(2).weights(torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError): MixtureWeights(2).weights(torch.zeros(2, 4))


def constructed_case(n=64, c_in=5, c_out=10, seed=0):
    "t_1 accurate in-domain but over-confident on out-classes; t_0 weaker in-domain, moderately confident outside."
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c_in, (n,), generator=g)
    onehot = F.one_hot(y, c_in).float()
    z_in = torch.stack([torch.randn(n, c_in, generator=g) * 2 + onehot,
                        torch.randn(n, c_in, generator=g) * 2 + onehot * 8])
    z_out = torch.stack([torch.randn(n, c_out, generator=g) * 4, torch.randn(n, c_out, generator=g) * 30])
    mask = in_domain_mask([set(), set(map(str, range(c_in)))], list(map(str, range(c_in))))
    return z_in, y, mask, z_out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_fit_moves_weight_out_of_domain_to_t0(seed):
    z_in, y, mask, z_out = constructed_case(seed=seed)
    mw = MixtureWeights(2)
    before_hinge = coa_weights_out_loss(mw, z_out).item()
    hist = fit_coa_weights(mw, z_in, y, mask, z_out)
    assert set(hist) >= {'loss', 'ce', 'ent'} and all(len(v) == 50 for v in hist.values())
    w_in_domain = mw.weights(mask)[1, 0].item()  # prompt 1's weight on one of its own classes
    assert mw.pi_out()[1] < w_in_domain and mw.pi_out()[1] < 0.5 < w_in_domain
    assert mw.a_out[1] < mw.a_in[1]
    assert before_hinge > 0 and hist['ent'][0] == pytest.approx(before_hinge)
    # the margin holds after fitting: t_1, scaled by pi_1^out, is d nats flatter than t_0 on every image
    assert hist['ent'][-1] == 0 and coa_weights_out_loss(mw, z_out).item() == 0
    pi1 = mw.pi_out()[1].detach()
    assert (entropy(pi1 * z_out[1]) >= entropy(z_out[0]) + 0.5).all()
    assert hist['loss'][-1] < hist['loss'][0]


def test_fit_in_domain_only_prefers_accurate_prompt_everywhere():
    "Without the hinge (logits_out=None) nothing pushes pi_1^out down: the out weights stay put."
    z_in, y, mask, _ = constructed_case()
    mw = MixtureWeights(2)
    fit_coa_weights(mw, z_in, y, mask, None)
    assert mw.weights(mask)[1, 0] > 0.5
    assert mw.a_out[1] == 0  # prompt 1's out scalar gets no gradient from in-domain CE


def test_fit_deterministic_and_minibatches():
    z_in, y, mask, z_out = constructed_case()
    runs = []
    for _ in range(2):
        mw = MixtureWeights(2)
        runs.append((fit_coa_weights(mw, z_in, y, mask, z_out, batch_size=16, seed=3, epochs=10),
                     mw.a_in.detach().clone(), mw.a_out.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
    mw = MixtureWeights(2)
    other = fit_coa_weights(mw, z_in, y, mask, z_out, batch_size=16, seed=4, epochs=10)
    assert other != runs[0][0]
    assert not z_in.requires_grad


def test_coa_weights_loss_components_and_gradients():
    z_in, y, mask, z_out = constructed_case()
    mw = MixtureWeights(2)
    loss = coa_weights_loss(mw, z_in, y, mask, z_out, d=0.5)
    ce = F.cross_entropy(mw.mix(z_in, mask), y)
    pi = mw.pi_out()
    torch.testing.assert_close(loss, ce + entropy_hinge(z_out[0], pi[1] * z_out[1], 0.5))
    loss.backward()
    assert mw.a_out.grad[1] > 0  # gradient descent lowers prompt 1's out weight
    torch.testing.assert_close(coa_weights_loss(mw, z_in, y, mask, None), ce)
    # scale_t0 scales t_0's out logits by pi_0^out too
    torch.testing.assert_close(coa_weights_out_loss(mw, z_out, scale_t0=True),
                               entropy_hinge(pi[0] * z_out[0], pi[1] * z_out[1], 0.5))


def test_out_loss_sums_over_learned_prompts():
    g = torch.Generator().manual_seed(5)
    mw = MixtureWeights(4)
    with torch.no_grad(): mw.a_out.normal_(generator=g)
    z_out = torch.randn(4, 12, 7, generator=g) * 10
    pi = mw.pi_out()
    expected = sum(entropy_hinge(z_out[0], pi[i] * z_out[i], 0.3) for i in (1, 2, 3))
    torch.testing.assert_close(coa_weights_out_loss(mw, z_out, d=0.3), expected)
    assert coa_weights_out_loss(MixtureWeights(1), z_out[:1]).item() == 0


# ---- out-class sets

REAL = ['golden_retriever', 'Annual Crop Land', 'Apply Eye Makeup', 'cat', 'airplane', 'sunflower', 'T-shirt/top',
        'water', 'bank', 'tree']


def _nouns():
    from wonderwords import RandomWord, Defaults
    return set(RandomWord(enhanced_prefixes=False, noun=Defaults.NOUNS).filter(include_categories=['noun']))


def _real_len(name): return len(' '.join(name.replace('_', ' ').split()))


@pytest.mark.parametrize('kind', ['words', 'strings'])
def test_out_class_names_seeded_exact_unique(kind):
    for n in (0, 1, 37, 200):
        a = out_class_names(n, kind, seed=0, exclude=REAL)
        assert a == out_class_names(n, kind, seed=0, exclude=REAL)
        assert len(a) == n and len({x.casefold() for x in a}) == n
        assert not {x.casefold() for x in a} & {' '.join(r.replace('_', ' ').split()).casefold() for r in REAL}
    assert out_class_names(50, kind, seed=0) != out_class_names(50, kind, seed=1)
    assert len(set(out_class_names(50, kind, seed=0)) & set(out_class_names(50, kind, seed=1))) < 25


@pytest.mark.parametrize('kind', ['words', 'strings'])
def test_out_class_names_reject_collisions_case_insensitively(kind):
    first = out_class_names(40, kind, seed=7)
    banned = [w.upper() for w in first[:10]] + [w.replace(' ', '_') for w in first[10:20]]
    again = out_class_names(40, kind, seed=7, exclude=banned)
    assert len(again) == 40
    assert not {w.casefold() for w in again} & {w.casefold() for w in first[:20]}


def test_words_are_dictionary_nouns():
    nouns = _nouns()
    words = out_class_names(300, 'words', seed=0, exclude=REAL)
    assert all(w in nouns for w in words)
    assert all(all(ch.isalpha() or ch in ' -' for ch in w) for w in words)
    assert 'cat' in nouns and 'cat' not in words  # a real class name is rejected even though it is a noun
    from wonderwords.random_word import is_profanity
    assert not any(is_profanity(w) for w in out_class_names(3000, 'words', seed=0))


def test_strings_are_random_letters_with_class_name_lengths():
    nouns = _nouns()
    strings = out_class_names(300, 'strings', seed=0, exclude=REAL)
    assert all(s.isalpha() and s.islower() and s.isascii() for s in strings)
    assert {len(s) for s in strings} <= {_real_len(r) for r in REAL}
    assert len({len(s) for s in strings}) > 3  # lengths vary like the names'
    assert sum(s in nouns for s in strings) <= 5  # random letters, not words: the two kinds differ
    free = out_class_names(300, 'strings', seed=0)
    assert {len(s) for s in free} <= set(range(4, 13))
    assert {len(s) for s in out_class_names(100, 'strings', seed=0, string_lengths=(6, 6))} == {6}


def test_words_cover_large_class_lists_and_errors():
    assert len(out_class_names(1000, 'words', seed=0)) == 1000  # |Y_out| = |Y_in| for ImageNet
    with pytest.raises(ValueError, match="'words', 'strings'"): out_class_names(3, 'nouns')
    with pytest.raises(ValueError): out_class_names(10 ** 5, 'words')
