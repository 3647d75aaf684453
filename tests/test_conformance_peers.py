"""Conformance of ProGrad, DAPT and CoOp with their authors' code: ProGrad's context init and token sequence, the epochs
and lambda each sets per dataset and number of shots, and DAPT's class prototypes (one random training crop per shot).

Every expected figure is the authors', named with its source file:
- ProGrad: BeierZhu/Prompt-align, ProGrad.public/trainers/prograd.py (PromptLearner, CUSTOM_TEMPLATES),
  ProGrad.public/README.md (configs by shots, lambda 0.8), ProGrad.public/scripts/base2new_train_prograd.sh.
- DAPT: mlvlab/DAPT, scripts/main.sh (configs by shots), trainers/dapt.py (prototype_generator).
- CoOp: KaiyangZhou/CoOp, COOP.md (few-shot configs by shots), scripts/cocoop/base2new_train.sh (CoOp at 16 shots).
"""
import pytest, torch
import torch.nn.functional as F

from cocoamix.coop import ProGrad, CoOp, PROGRAD_TEMPLATES
from cocoamix.dapt import DAPT, one_view_per_image, class_prototypes
from cocoamix.data import train_transform, ImageDataset
from cocoamix.data import test_transform as eval_transform
from cocoamix.method import TrainImages
from cocoamix.registry import make_method, resolve_config, load_method

# ProGrad's CUSTOM_TEMPLATES with a comma (trainers/prograd.py), and real class names of each dataset
COMMA = {'oxford_pets': ('a type of pet, a photo of a {}.', ['Abyssinian', 'american bulldog', 'great pyrenees']),
         'oxford_flowers': ('a type of flower, a photo of a {}.', ['pink primrose', 'bird of paradise']),
         'fgvc_aircraft': ('a type of aircraft, a photo of a {}.', ['707-320', 'Boeing 737-800', 'A300B4']),
         'food101': ('a type of food, a photo of {}.', ['apple pie', 'baby back ribs', 'pho'])}
NO_COMMA = {'dtd': ('a texture of {}.', ['banded', 'crosshatched']),
            'eurosat': ('a centered satellite photo of {}.', ['Annual Crop Land', 'Pasture Land']),
            'ucf101': ('a photo of a person doing {}.', ['Apply Eye Makeup', 'Jumping Jack'])}


def authors_prograd_prompt(clip, template, classnames, n_ctx=16):
    """ProGrad's PromptLearner (Prompt-align ProGrad.public/trainers/prograd.py), its rule written out with CTX_INIT on:
        ctx_init = CUSTOM_TEMPLATES[name].replace(" {}.", "").replace("_", " ")
        prompt_n_ctx = len(ctx_init.split(" "))
        ctx_vectors = zeros(n_ctx, dim); ctx_vectors[n_ctx - prompt_n_ctx:] = token_embedding(tokenize(ctx_init))[0, 1:1 + prompt_n_ctx]
        prompt_prefix = " ".join(["X"] * (n_ctx - prompt_n_ctx)); prompt_prefix = f"{prompt_prefix} {ctx_init}"
        prompts = [prompt_prefix + " " + name + "." for name in classnames]       # tokenized_prompts
        token_prefix = embedding[:, :1]; token_suffix = embedding[:, 1 + n_ctx:]
        forward: cat([token_prefix, ctx, token_suffix]); the text encoder reads EOT at tokenized_prompts.argmax(-1)
    Returns (token ids [C, 77], the embeddings fed to the text encoder [C, 77, W], EOT positions [C], ctx_vectors)."""
    ctx_init = template.replace(' {}.', '').replace('_', ' ')
    prompt_n_ctx = len(ctx_init.split(' '))
    assert n_ctx >= prompt_n_ctx
    with torch.no_grad():
        embedding = clip.token_embedding(clip.tokenize([ctx_init])).float()
        ctx_vectors = torch.zeros(n_ctx, clip.text_width)
        ctx_vectors[n_ctx - prompt_n_ctx:] = embedding[0, 1:1 + prompt_n_ctx]
        prompt_prefix = ' '.join(['X'] * (n_ctx - prompt_n_ctx))
        prompt_prefix = f'{prompt_prefix} {ctx_init}'
        tokenized = clip.tokenize([prompt_prefix + ' ' + name + '.' for name in classnames])
        emb = clip.token_embedding(tokenized).float()
        fed = torch.cat([emb[:, :1], ctx_vectors.expand(len(classnames), -1, -1), emb[:, 1 + n_ctx:]], dim=1)
    return tokenized, fed, tokenized.argmax(-1), ctx_vectors


def encode(clip, words):
    return clip.tokenizer.encode(words) if hasattr(clip.tokenizer, 'encode') else __import__('open_clip').tokenizer._tokenizer.encode(words)


@pytest.mark.parametrize('dataset', list(COMMA) + list(NO_COMMA))
def test_prograd_feeds_the_authors_token_sequence(tiny_clip, dataset):
    clip = tiny_clip
    template, names = {**COMMA, **NO_COMMA}[dataset]
    if dataset in PROGRAD_TEMPLATES: assert PROGRAD_TEMPLATES[dataset] == template
    ids, fed, eot, ctx0 = authors_prograd_prompt(clip, template, names)
    m = make_method('prograd', clip, dataset, 4, template=template)
    assert m.config.template == template and m.config.n_ctx == 16 and m.config.ctx_init == 'template'
    p = m.new_prompt(names)
    ours_ids = p.token_ids(names)
    assert torch.equal(ours_ids, ids)                         # SOT, 16 slots, leftover words, class, '.', EOT, padding
    emb, ours_eot = p(names)
    assert torch.equal(ours_eot, eot) and torch.equal(clip.eot_index(ours_ids), eot)
    torch.testing.assert_close(p.ctx.detach(), ctx0)          # zeros, then the first `words` tokens of the phrase
    torch.testing.assert_close(emb.detach(), fed)             # the whole input of the text encoder
    with torch.no_grad():                                     # and the features, through the shared-prefix pass
        torch.testing.assert_close(p.text_features(names), clip.encode_text_embeddings(fed, eot, truncate=False), atol=1e-5, rtol=1e-4)
    # the figures, spelled out: the comma takes a context slot, so the phrase's last word stays frozen before the class
    sot, eot_id = int(ids[0, 0]), int(ids[0, eot[0]])
    phrase = template.replace(' {}.', '')
    left = {'oxford_pets': 'a', 'oxford_flowers': 'a', 'fgvc_aircraft': 'a', 'food101': 'of'}.get(dataset)
    assert p.n_frozen == (1 if left else 0) and len(encode(clip, phrase)) == len(phrase.split(' ')) + p.n_frozen
    for i, name in enumerate(names):
        name_ids = encode(clip, name)
        expected = [sot] + [int(t) for t in ids[i, 1:17]] + (encode(clip, left) if left else []) + name_ids + encode(clip, '.') + [eot_id]
        assert ids[i, :len(expected)].tolist() == expected and int(eot[i]) == len(expected) - 1
        assert int(eot[i]) == 1 + 16 + (1 if left else 0) + len(name_ids) + 1


def test_prograd_ctx_of_the_pets_template(tiny_clip):
    "Pets: 8 words, 9 tokens; the context's last 8 slots hold 'a type of pet , a photo of', the 9th token 'a' stays frozen."
    clip = tiny_clip
    p = make_method('prograd', clip, 'oxford_pets', 4).new_prompt(['Abyssinian'])
    phrase_ids = encode(clip, 'a type of pet, a photo of a')
    assert len(phrase_ids) == 9
    with torch.no_grad(): first8 = clip.token_embedding(torch.tensor([phrase_ids[:8]], device=clip.device))[0].float()
    assert torch.equal(p.ctx[:8].detach(), torch.zeros(8, clip.text_width)) and torch.equal(p.ctx[8:].detach(), first8)
    ids = p.token_ids(['Abyssinian'])[0]
    assert ids[17].item() == phrase_ids[8] == encode(clip, 'a')[0]
    assert int(p(['Abyssinian'])[1][0]) == 1 + 16 + 1 + len(encode(clip, 'Abyssinian')) + 1


def test_prograd_keeps_its_frozen_words_through_save_and_load(tiny_clip, tmp_path, setup):
    clip, base, _, train, _ = setup
    m = make_method('prograd', clip, epochs=1, template='a type of pet, a photo of a {}.').fit(train, base.classnames, progress=False)
    x = train.view(0)
    before = m.logits(x, base.classnames)
    loaded = load_method(m.save(tmp_path / 'prograd.safetensors'), clip)
    torch.testing.assert_close(loaded.logits(x, base.classnames), before)
    assert loaded.prompts[0].n_frozen == 1 and loaded.prompts[0].prompt_prefix == m.prompts[0].prompt_prefix


# --- epochs and lambda per setting ------------------------------------------------------------------------------------
SHOTS = [1, 2, 4, 8, 16]
EPOCHS_BY_SHOTS = [50, 100, 100, 200, 200]


@pytest.mark.parametrize('name', ['coop', 'prograd', 'dapt'])
def test_few_shot_epochs_by_shots_and_imagenet(name):
    """CoOp COOP.md (rn50_ep50 / rn50_ep100 / rn50, *_ep50 on ImageNet), ProGrad.public/README.md (the same configs) and
    DAPT scripts/main.sh (vit_b16_ep50 / _ep100 / vit_b16, vit_b16_ep50 on ImageNet): 1, 2, 4, 8, 16 shots -> 50, 100, 100, 200, 200."""
    for shots, epochs in zip(SHOTS, EPOCHS_BY_SHOTS):
        cfg, source = resolve_config(name, 'caltech101', shots)
        assert cfg.epochs == epochs and source['epochs'].startswith('peer'), (name, shots, cfg.epochs, source['epochs'])
        cfg, source = resolve_config(name, 'imagenet', shots)
        assert cfg.epochs == 50 and source['epochs'].startswith('peer')
    assert resolve_config(name, 'imagenet', 4, protocol='transfer')[0].epochs == 50


def test_prograd_lambda_by_dataset_and_shots():
    "ProGrad.public/README.md: lambda 0.8 for the 8- and 16-shot results on Flowers102, DTD and EuroSAT; scripts/prograd.sh: 1.0 elsewhere."
    for dataset in ('oxford_flowers', 'dtd', 'eurosat'):
        for shots in SHOTS:
            cfg, source = resolve_config('prograd', dataset, shots)
            assert cfg.prograd_lambda == (0.8 if shots >= 8 else 1.0) and source['prograd_lambda'].startswith('peer'), (dataset, shots)
    for dataset in ('oxford_pets', 'caltech101', 'imagenet', 'food101', 'ucf101'):
        assert all(resolve_config('prograd', dataset, k)[0].prograd_lambda == 1.0 for k in SHOTS)


def test_prograd_base_to_new_is_its_4_shot_script():
    "ProGrad.public/scripts/base2new_train_prograd.sh: SHOTS=4, CFG=rn50_ep100, LAMBDA=1.0, N_CTX=16; README: rn50_ep50 for ImageNet."
    cfg, source = resolve_config('prograd', 'oxford_pets', 4, protocol='base2new')
    assert (cfg.epochs, cfg.prograd_lambda, cfg.n_ctx, cfg.batch_size) == (100, 1.0, 16, 32) and source['epochs'].startswith('peer')
    assert resolve_config('prograd', 'imagenet', 4, protocol='base2new')[0].epochs == 50
    cfg, source = resolve_config('prograd', 'dtd', 16, protocol='base2new')    # not run by the authors: the rule, tagged ours
    assert (cfg.epochs, cfg.prograd_lambda) == (200, 0.8) and source['epochs'].startswith('ours') and source['prograd_lambda'].startswith('ours')


def test_coop_base_to_new_at_4_shots_is_ours():
    """CoCoOp's scripts/cocoop/base2new_train.sh runs CoOp only at SHOTS=16 with vit_b16_ctxv1 (MAX_EPOCH 200) and
    vit_b16_ep50_ctxv1 on ImageNet; 100 epochs at 4 shots in base-to-new is our extrapolation by COOP.md's shot rule."""
    cfg, source = resolve_config('coop', 'oxford_pets', 4, protocol='base2new')
    assert cfg.epochs == 100 and source['epochs'].startswith('ours')
    assert CoOp.setting_defaults('oxford_pets', 4, 'base2new')['epochs'][2].startswith('ours: extrapolated from')
    cfg, source = resolve_config('coop', 'oxford_pets', 16, protocol='base2new')
    assert cfg.epochs == 200 and source['epochs'].startswith('peer')
    cfg, source = resolve_config('coop', 'imagenet', 4, protocol='base2new')
    assert cfg.epochs == 50 and source['epochs'].startswith('peer')


def test_dapt_outside_its_few_shot_scripts_is_ours():
    "DAPT ships few-shot scripts only (scripts/main.sh, eval.sh): its rule in base-to-new is ours; ImageNet stays 50 (theirs)."
    cfg, source = resolve_config('dapt', 'dtd', 4, protocol='base2new')
    assert cfg.epochs == 100 and source['epochs'].startswith('ours') and source['lr'].startswith('peer')
    assert resolve_config('dapt', 'imagenet', 16, protocol='transfer')[1]['epochs'].startswith('peer')


@pytest.mark.parametrize('name', ['contcoop', 'capt'])
def test_coop_rule_borrowed_by_methods_without_scripts_is_ours(name):
    for shots, epochs in zip(SHOTS, EPOCHS_BY_SHOTS):
        cfg, source = resolve_config(name, 'dtd', shots, protocol='base2new')
        assert cfg.epochs == epochs and source['epochs'].startswith('ours')


# --- DAPT's prototypes ------------------------------------------------------------------------------------------------
def test_dapt_prototypes_take_one_training_crop_per_shot(setup):
    """DAPT trainers/dapt.py prototype_generator: one batch holding every training image once, the training transform
    (random resized crop + flip), the frozen encoder, features normalised, mean per class (not renormalised)."""
    clip, base, _, train, _ = setup
    assert train.n_views == 2
    imgs = TrainImages(base.train, train_transform(clip.image_size, clip.mean, clip.std), train)
    m = make_method('dapt', clip, epochs=1, batch_size=64)
    m.fit(imgs, base.classnames, progress=False)
    one = one_view_per_image(train.x, m.config.seed)
    picks = [[v for v in range(2) if torch.equal(one[i], train.x[v, i])] for i in range(len(train))]
    assert all(picks) and {p[0] for p in picks} == {0, 1}            # one whole cached view per image, both views drawn
    normed = F.normalize(one.float(), dim=-1)
    expected = torch.stack([normed[train.labels == c].mean(0) for c in range(len(base.classnames))])
    torch.testing.assert_close(m.prototypes.cpu(), expected)
    mean_of_views = torch.stack([F.normalize(train.x.float(), dim=-1)[:, train.labels == c].reshape(-1, train.x.shape[-1]).mean(0)
                                 for c in range(len(base.classnames))])
    assert not torch.allclose(m.prototypes.cpu(), mean_of_views)     # no longer the mean of every cached view
    assert not torch.equal(one_view_per_image(train.x, 2), one)      # the run's seed draws the crops
    with pytest.raises(ValueError, match='one feature per image'):
        class_prototypes(train.x, train.labels, len(base.classnames))


def test_dapt_prototypes_without_a_cache_use_one_seeded_training_crop(setup):
    clip, base, *_ = setup
    tf = train_transform(clip.image_size, clip.mean, clip.std)
    protos = []
    for seed in (1, 1, 2):
        m = make_method('dapt', clip, epochs=1, batch_size=64, seed=seed)
        m.fit(TrainImages(base.train, tf), base.classnames, progress=False)
        protos.append(m.prototypes.cpu())
    torch.testing.assert_close(protos[0], protos[1])                 # reproducible under the seed
    assert not torch.allclose(protos[0], protos[2])                  # random crops: another seed, other crops
    centre = clip.encode_images(torch.utils.data.DataLoader(ImageDataset(base.train, eval_transform(clip.image_size, clip.mean, clip.std)), batch_size=64))
    assert not torch.allclose(protos[0], class_prototypes(centre, torch.as_tensor(base.train.labels), len(base.classnames)))
